"""A local OpenAI-compatible chat server that misbehaves on purpose, for tests and benchmarks.

::

    with FakeChatServer(model="fake-vlm", latency=0.05, script=["500", "ok"]) as server:
        client = OpenAIClient(server.base_url, "fake-vlm")

Each request takes the next behaviour from ``script`` (then ``default``), or the behaviour that
``rules`` gives for text found in the prompt:

- ``ok``: a chat completion whose text names the number of images received (and for a concept
  request, JSON with a concept and category);
- ``500`` / ``429`` (with ``Retry-After: 0``): an error reply;
- ``stall``: waits ``stall_seconds`` before answering (to trip client time-outs);
- ``garbage``: a 200 reply that is not JSON; ``nochoices``: JSON without ``choices``;
- ``no_image``: HTTP 400 "this model does not support image input".

A request for another model name gets HTTP 404, a bad key 401, an image that is not a
decodable ``data:`` URL 400. ``requests`` counts requests, ``log`` records
``(behaviour, n_images)``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


class FakeChatServer:
    def __init__(self, model: str = "fake-vlm", api_key: str | None = None, latency: float = 0.0,
                 script: list[str] | None = None, default: str = "ok", rules: dict[str, str] | None = None,
                 stall_seconds: float = 5.0, check_images: bool = True):
        self.model, self.api_key, self.latency = model, api_key, latency
        self.script, self.default, self.rules = list(script or []), default, dict(rules or {})
        self.stall_seconds, self.check_images = stall_seconds, check_images
        self.lock = threading.Lock()
        self.requests = 0
        self.log: list[tuple[str, int]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _behaviour(self, prompt: str) -> str:
        with self.lock:
            self.requests += 1
            for needle, behaviour in self.rules.items():
                if needle in prompt:
                    return behaviour
            return self.script.pop(0) if self.script else self.default

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes | dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode() if isinstance(body, dict) else body
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (time-out)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                try:
                    request = json.loads(self.rfile.read(length))
                except ValueError:
                    return self._send(400, {"error": {"message": "request body is not JSON"}})
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._send(401, {"error": {"message": "invalid api key"}})
                if request.get("model") != server.model:
                    return self._send(404, {"error": {"message": f"The model `{request.get('model')}` does not exist"}})
                texts, n_images = [], 0
                for message in request.get("messages", []):
                    content = message.get("content")
                    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
                    for part in parts:
                        if part.get("type") == "text":
                            texts.append(part["text"])
                        elif part.get("type") == "image_url":
                            n_images += 1
                            if server.check_images and not _decodes(part["image_url"]["url"]):
                                return self._send(400, {"error": {"message": "invalid image: cannot decode image_url"}})
                prompt = "\n".join(texts)
                behaviour = server._behaviour(prompt)
                with server.lock:
                    server.log.append((behaviour, n_images))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.latency:
                        time.sleep(server.latency)
                    self._reply(behaviour, prompt, n_images)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _reply(self, behaviour: str, prompt: str, n_images: int) -> None:
                if behaviour == "500":
                    return self._send(500, {"error": {"message": "internal error (on purpose)"}})
                if behaviour == "429":
                    return self._send(429, {"error": {"message": "rate limited (on purpose)"}}, {"Retry-After": "0"})
                if behaviour == "no_image":
                    return self._send(400, {"error": {"message": "this model does not support image input"}})
                if behaviour == "garbage":
                    return self._send(200, b"<html>definitely not json")
                if behaviour == "nochoices":
                    return self._send(200, {"id": "x", "object": "chat.completion"})
                if behaviour == "stall":
                    time.sleep(server.stall_seconds)
                if "category" in prompt and n_images == 0:
                    text = '```json\n{"concept": "red star", "category": "object"}\n```'
                else:
                    text = f"The highlighted regions share a red star (seen in {n_images} images)."
                self._send(200, {"id": "chatcmpl-fake", "object": "chat.completion", "model": server.model,
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}]})

        return Handler


def _decodes(url: str) -> bool:
    if not url.startswith("data:image/") or ";base64," not in url:
        return False
    try:
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1], validate=True))) as im:
            im.load()
        return True
    except Exception:
        return False


def main() -> None:
    """``python tests/fake_server.py --latency 0.5``: serve until killed; prints the base URL."""
    import argparse

    p = argparse.ArgumentParser(description="a local fake OpenAI-compatible chat server (answers 'ok' after --latency)")
    p.add_argument("--model", default="fake-vlm")
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--check-images", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    with FakeChatServer(model=args.model, latency=args.latency, check_images=args.check_images) as server:
        print(server.base_url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
