"""A small client for OpenAI-compatible chat endpoints (vLLM, SGLang, Ollama, llama.cpp, hosted APIs).

Standard library only (``urllib``). Images go as ``data:`` URLs. Time-outs, connection errors,
HTTP 5xx and 429 and malformed replies are retried with exponential backoff (honouring
``Retry-After``); a refused model name, a refused image, bad credentials and other 4xx are
fatal at once, because retrying cannot fix them.
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from PIL import Image

from ..errors import MmsaeError


class FatalRequestError(MmsaeError):
    """The endpoint refused the request in a way no retry can fix (model name, image, auth)."""


class TransientRequestError(Exception):
    """A request that failed after every retry (time-outs, 5xx, 429, malformed replies)."""


def image_data_url(image: Image.Image, max_side: int | None = None, fmt: str = "jpeg") -> str:
    """A ``data:`` URL of ``image`` (JPEG quality 92 by default: several times faster to encode
    than PNG and smaller on the wire), shrunk so its longer side is at most ``max_side``."""
    image = image.convert("RGB")
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, format="JPEG", quality=92)
    else:
        image.save(buf, format="PNG")
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def user_message(text: str, images: list[Image.Image], max_side: int | None = None) -> list[dict]:
    """One user turn with the images first, then the text (OpenAI's content-part format)."""
    content: list[dict] = [{"type": "image_url", "image_url": {"url": image_data_url(im, max_side)}} for im in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


@dataclass
class OpenAIClient:
    """POST ``{base_url}/chat/completions`` with retries. Thread-safe (no shared connection)."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    max_retries: int = 4
    backoff: float = 1.0  # first retry waits about this long, doubling each time
    max_backoff: float = 30.0
    temperature: float = 0.0
    max_tokens: int = 200

    def chat(self, messages: list[dict]) -> str:
        """The reply text of one chat completion, retrying transient failures."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                return self._post(body)
            except _Retry as e:
                last, wait = str(e), e.retry_after
            if attempt == self.max_retries:
                break
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
            time.sleep(max(delay, min(wait or 0.0, self.max_backoff)))
        raise TransientRequestError(f"{self.max_retries + 1} attempts failed; last: {last}")

    def _post(self, body: bytes) -> str:
        url = self.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _error_message(e)
            if e.code == 429 or e.code >= 500:
                raise _Retry(f"HTTP {e.code}: {detail}", _retry_after(e)) from None
            raise self._fatal(e.code, detail) from None
        except (TimeoutError, socket.timeout) as e:
            raise _Retry(f"timed out after {self.timeout:g} s") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retry(f"timed out after {self.timeout:g} s") from e
            if isinstance(e.reason, ConnectionRefusedError):
                raise FatalRequestError(f"cannot connect to {self.base_url}: connection refused; is the server running? (--base-url)") from e
            raise _Retry(f"connection error: {e.reason}") from e
        except (ConnectionError, OSError) as e:  # reset, remote closed, http.client errors
            raise _Retry(f"connection error: {e}") from e
        try:
            reply = json.loads(raw)
            text = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry(f"malformed reply: {raw[:120]!r}") from None
        if isinstance(text, list):  # some servers return content parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        if not isinstance(text, str) or not text.strip():
            raise _Retry("empty reply")
        return text.strip()

    def _fatal(self, code: int, detail: str) -> FatalRequestError:
        low = detail.lower()
        if code in (401, 403):
            return FatalRequestError(f"{self.base_url} refused the credentials (HTTP {code}: {detail}); set --api-key or OPENAI_API_KEY")
        if "image" in low or "vision" in low or "multimodal" in low:
            return FatalRequestError(f"{self.base_url} cannot take the images for model {self.model!r} (HTTP {code}: {detail}); "
                                     "use a model with image input")
        if code == 404 or "model" in low:
            return FatalRequestError(f"{self.base_url} refused the model name {self.model!r} (HTTP {code}: {detail}); "
                                     "check --model against the server's /models list")
        return FatalRequestError(f"{self.base_url} refused the request (HTTP {code}: {detail})")


class _Retry(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read()
        data = json.loads(body)
        msg = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        return " ".join(str(msg).split())[:200]
    except Exception:
        return e.reason if isinstance(e.reason, str) else str(e.code)


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    value = e.headers.get("Retry-After") if e.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
