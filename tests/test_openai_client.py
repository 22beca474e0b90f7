"""The OpenAI-compatible client against local servers that misbehave on purpose, and clean exits.

Each server listens on 127.0.0.1 and is started and stopped by its test: one that redirects
elsewhere, one that trickles a byte every 0.3 s, one that accepts and never answers, one that
answers 404, and none at all.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fake_server import FakeChatServer
from mmsae.errors import MmsaeError
from mmsae.explain import ExplainConfig, explain
from mmsae.explain.backends import ExplainRequest, OpenAIExplainer, threaded
from mmsae.explain.openai_client import FatalRequestError, OpenAIClient, RequestCancelled
from test_explain import make_index

HELLO = [{"role": "user", "content": "hi"}]
OK = {"choices": [{"message": {"role": "assistant", "content": "hello"}}]}


@contextmanager
def http_server(respond):
    """An HTTP server whose every request (POST or GET) is answered by ``respond(handler)``.

    Yields ``(base_url, seen)``; ``seen`` collects ``(method, path, headers)`` of each request."""
    seen: list[tuple[str, str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append((self.command, self.path, dict(self.headers)))
            respond(self)

        do_GET = do_POST  # a 302 or 303 followed by urllib arrives as a GET

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()  # quick to shut down
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def send(handler, code: int, body: bytes | dict = b"", headers: dict | None = None) -> None:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    handler.send_response(code)
    for k, v in {"Content-Length": str(len(data)), **(headers or {})}.items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(data)


@contextmanager
def tcp_server(handle=None):
    """A TCP listener on 127.0.0.1 that runs ``handle(conn)`` per connection; ``handle=None``
    never accepts, yet the kernel completes each connection (a server that never answers).
    Yields ``(base_url, connections)``, ``connections`` a one-item list counting them."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    connections = [0]

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            connections[0] += 1
            threading.Thread(target=_handle, args=(handle, conn), daemon=True).start()

    if handle is not None:
        threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1", connections
    finally:
        listener.close()


def _handle(handle, conn):
    try:
        handle(conn)
    except OSError:  # the client hung up
        pass
    finally:
        conn.close()


def finishes_within(seconds: float, fn):
    """``(the exception fn raised or its result, seconds taken)``; fails if fn runs longer than ``seconds``."""
    out: list = []

    def target():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001
            out.append(e)

    t0 = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return out[0], time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("code", [302, 307])
def test_a_redirect_is_not_followed_and_the_key_stays(code):
    with http_server(lambda h: send(h, 200, OK)) as (elsewhere, seen_elsewhere):
        target = elsewhere + "/chat/completions"
        with http_server(lambda h: send(h, code, headers={"Location": target})) as (base_url, seen):
            client = OpenAIClient(base_url, "m", api_key="sk-secret", timeout=2, max_retries=3, backoff=0.01)
            error, _ = finishes_within(10, lambda: client.chat(HELLO))
    assert isinstance(error, FatalRequestError)
    message = str(error)
    assert f"redirected to {target}" in message and "does not follow redirects" in message
    assert base_url.removesuffix("/v1") in message and "set --base-url to the final URL" in message
    assert "sk-secret" not in message and "\n" not in message
    assert len(seen) == 1 and seen[0][2]["Authorization"] == "Bearer sk-secret"  # asked once, not retried
    assert seen_elsewhere == []  # neither the key nor the prompt went to the other port


def test_a_server_that_trickles_bytes_cannot_hold_a_request():
    def trickle(conn):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while True:  # a header that never ends: each byte well inside a 1 s read time-out
            conn.sendall(b"x")
            time.sleep(0.3)

    with tcp_server(trickle) as (base_url, connections):
        client = OpenAIClient(base_url, "m", timeout=1.0, max_retries=1, backoff=0.01)
        error, elapsed = finishes_within(8, lambda: client.chat(HELLO))
    assert isinstance(error, FatalRequestError), error
    assert f"no reply from {base_url}" in str(error) and "2 attempts; last: no complete reply within 1 s" in str(error)
    assert connections[0] == 2 and 1.9 < elapsed < 3.5  # two attempts, each cut at its 1 s deadline


def test_a_server_that_never_answers_costs_the_total_budget_not_every_retry():
    with tcp_server() as (base_url, _):
        client = OpenAIClient(base_url, "m", timeout=1.0, max_retries=20, backoff=0.01)
        error, elapsed = finishes_within(8, lambda: client.chat(HELLO))
    assert isinstance(error, FatalRequestError), error
    assert f"no reply from {base_url} in 3 s" in str(error) and "--timeout" in str(error)
    assert 2.9 < elapsed < 4.0  # 3 x --timeout in all, not 21 attempts of 1 s


def test_a_refused_connection_fails_at_once():
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    client = OpenAIClient(base_url, "m", timeout=2, max_retries=4, backoff=1.0)
    error, elapsed = finishes_within(5, lambda: client.chat(HELLO))
    assert isinstance(error, FatalRequestError) and "connection refused; is the server running?" in str(error)
    assert elapsed < 1.0  # no retries, no backoff


def test_a_404_says_endpoint_not_found():
    with http_server(lambda h: send(h, 404, b"<html><body>Not Found</body></html>")) as (base_url, seen):
        client = OpenAIClient(base_url + "/wrong", "m", timeout=2, max_retries=3, backoff=0.01)
        error, _ = finishes_within(5, lambda: client.chat(HELLO))
    assert isinstance(error, FatalRequestError)
    assert f"endpoint not found: {base_url}/wrong/chat/completions (HTTP 404: <html><body>Not Found</body></html>)" in str(error)
    assert "model" not in str(error) and len(seen) == 1


@pytest.mark.parametrize("url, says", [
    ("localhost:8000/v1", "did you mean http://localhost:8000/v1?"),
    ("ftp://example.com/v1", "is not an http:// or https:// URL"),
    ("http:///v1", "is not an http:// or https:// URL with a host"),
    ("http://example.com:99999/v1", "is not an http:// or https:// URL"),
    ("https://user:hunter2@example.com/v1", "holds a user name or password"),
])
def test_a_bad_base_url_is_a_one_line_error_at_start_up(url, says, monkeypatch):
    with pytest.raises(MmsaeError, match="--base-url") as e:
        OpenAIClient(url, "m")
    assert says in str(e.value) and "\n" not in str(e.value) and "hunter2" not in str(e.value)
    # the environment goes through the same check, naming the flag the caller has
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    with pytest.raises(MmsaeError, match="--judge-base-url"):
        OpenAIClient.from_env("m", url_flag="--judge-base-url")


def test_from_env_reads_the_environment_once_for_every_caller(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://example.com:8000/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("OPENAI_MODEL", "env-model")
    client = OpenAIClient.from_env(None, timeout=5)
    assert (client.base_url, client.api_key, client.model, client.timeout) == ("http://example.com:8000/v1", "sk-env", "env-model", 5)
    assert "sk-env" not in repr(client)
    client = OpenAIClient.from_env("m", "http://other:1/v1", "sk-flag")
    assert (client.base_url, client.api_key) == ("http://other:1/v1", "sk-flag")
    monkeypatch.delenv("OPENAI_MODEL")
    with pytest.raises(MmsaeError, match=r"the judge needs --judge-model \(the endpoint's model name\) or \$OPENAI_MODEL"):
        OpenAIClient.from_env(None, needs="the judge needs --judge-model")


def test_the_steering_judge_uses_the_same_checked_client():
    from mmsae.steer import openai_judge

    with pytest.raises(MmsaeError, match="--judge-base-url 'localhost:8000' .* did you mean http://localhost:8000"):
        openai_judge("fake-vlm", "localhost:8000", "red star")
    with FakeChatServer() as server:  # it answers "The highlighted regions share a red star ...": not a yes
        assert openai_judge("fake-vlm", server.base_url, "red star")("a red star") is False
    assert server.requests == 1


def test_close_cuts_a_request_in_flight_short():
    with tcp_server() as (base_url, _):
        client = OpenAIClient(base_url, "m", timeout=30, max_retries=4)
        threading.Timer(0.3, client.close).start()
        error, elapsed = finishes_within(5, lambda: client.chat(HELLO))
    assert isinstance(error, RequestCancelled) and elapsed < 1.5
    with pytest.raises(RequestCancelled):  # and refuses new requests
        client.chat(HELLO)


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("explain-")]


def test_threaded_cancels_and_joins_its_workers():
    cancelled = []
    results = threaded(range(100), lambda x: time.sleep(0.1) or x, 4, cancel=lambda: cancelled.append(True))
    next(results)
    results.close()  # the caller stops early: cancel, then join
    assert cancelled == [True] and _workers() == []
    assert sorted(x for x, _ in threaded(range(10), lambda x: x * x, 3, cancel=lambda: cancelled.append(False))) == list(range(10))
    assert cancelled == [True] and _workers() == []  # a finished run is joined too, and not cancelled


def test_stopping_early_leaves_no_thread_inside_torch_at_exit():
    # a daemon thread still inside torch when the interpreter exits aborts it: SIGABRT, status -6
    script = """if True:
        import sys, torch
        from mmsae.explain.backends import threaded
        def work(i):
            x = torch.randn(128, 128)
            for _ in range(300):
                x = torch.tanh(x @ x)
            return i
        results = threaded(range(100), work, 4)
        next(results)
        results.close()  # the caller stops early (a fatal error, Ctrl-C) and the program ends
        sys.exit(3)
    """
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr


def test_a_run_stops_when_feature_after_feature_fails():
    with FakeChatServer(default="500") as server:
        explainer = OpenAIExplainer(OpenAIClient(server.base_url, "fake-vlm", max_retries=0), concurrency=1)
        with pytest.raises(FatalRequestError, match=r"10 features in a row failed after retries \(last: 1 attempts failed; last: HTTP 500"):
            for _ in explainer.run(range(100), lambda f: ExplainRequest(f, [], "p", []), concepts=False):
                pass
    assert 10 <= server.requests <= 12 and _workers() == []


# --- the command: exit codes and one-line errors, never a signal ----------------------------------

@pytest.fixture(scope="module")
def index_path(tmp_path_factory):
    return make_index(tmp_path_factory.mktemp("cli") / "index").path


def mmsae_explain(index_path, out, base_url, *args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mmsae.cli", "explain", "--index", str(index_path), "--out", str(out), "--model", "fake-vlm",
           "--base-url", base_url, "--api-key", "k", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})  # no progress bar: stderr holds only errors


def test_explain_fails_fast_when_the_endpoint_is_silent_or_misspelt(index_path, tmp_path):
    cfg = dict(index=str(index_path), out=str(tmp_path / "e.jsonl"), model="fake-vlm", timeout=1.0, max_retries=1)
    with tcp_server() as (silent_url, _):
        error, elapsed = finishes_within(10, lambda: explain(ExplainConfig(**cfg, base_url=silent_url)))
    assert isinstance(error, MmsaeError) and f"no reply from {silent_url}" in str(error), error
    assert elapsed < 4 and _workers() == []  # every worker's request timed out at once; all joined
    with pytest.raises(MmsaeError, match="did you mean http://localhost:8000/v1"):
        explain(ExplainConfig(**cfg, base_url="localhost:8000/v1"))


def test_explain_exits_2_with_one_line_when_nothing_listens(index_path, tmp_path):
    run = mmsae_explain(index_path, tmp_path / "e.jsonl", f"http://127.0.0.1:{free_port()}/v1")
    rc, stderr = run.wait(timeout=120), run.stderr.read()
    assert rc == 2, (rc, stderr)  # not -6 (SIGABRT: a worker thread still inside torch at exit)
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("mmsae explain: error: cannot connect to"), stderr


def test_explain_exits_0_after_a_good_run(index_path, tmp_path):
    with FakeChatServer(api_key="k") as server:
        run = mmsae_explain(index_path, tmp_path / "e.jsonl", server.base_url, "--concurrency", "3")
        rc = run.wait(timeout=120)
    assert rc == 0, run.stderr.read()
    assert run.stderr.read() == "" and "6 features explained" in run.stdout.read()


def test_ctrl_c_exits_130(index_path, tmp_path):
    with FakeChatServer(api_key="k", latency=60) as server:  # every request hangs until Ctrl-C
        run = mmsae_explain(index_path, tmp_path / "e.jsonl", server.base_url, "--concurrency", "2", "--timeout", "60")
        deadline = time.monotonic() + 120
        while server.requests < 2 and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until both workers are inside a request
        run.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rc = run.wait(timeout=30)
    assert rc == 130, run.stderr.read()
    assert time.monotonic() - t0 < 5  # the requests in flight were cut short, not waited for
    assert run.stderr.read().strip().splitlines() == ["mmsae explain: interrupted; rerun the same command to resume"]


def test_a_bad_base_url_is_refused_before_the_index_is_read(tmp_path):
    from mmsae.explain import ExplainConfig

    # the index folder does not even exist: the URL is what the user hears about first
    with pytest.raises(MmsaeError, match=r"--base-url 'ftp://host/v1' is not an http:// or https:// URL"):
        ExplainConfig(index=str(tmp_path / "no-index"), out=str(tmp_path / "e.jsonl"), base_url="ftp://host/v1")
