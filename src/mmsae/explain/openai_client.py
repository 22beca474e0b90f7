"""A small client for OpenAI-compatible chat endpoints (vLLM, SGLang, Ollama, llama.cpp, hosted APIs).

Standard library only (``http.client``), because it keeps promises that general HTTP clients
(urllib, httpx and so the ``openai`` SDK) do not keep by default:

- The key goes only where the user sent it: redirects are never followed, and a 3xx reply is a
  fatal error that names where it pointed, so neither the key nor the prompt goes to another
  scheme, host or port.
- ``timeout`` is a wall-clock deadline for a whole attempt (connect, send, receive): a watchdog
  shuts the socket down when it passes, so a server that trickles bytes cannot hold a request.
- Retries (time-outs, connection errors, 5xx, 429, malformed replies; exponential backoff that
  honours ``Retry-After``) are bounded in count (``max_retries``) and in wall-clock time
  (``total_timeout``, default three times ``timeout``).
- Fatal at once, because retrying cannot fix them: a redirect, a refused connection, an unknown
  host, a missing endpoint (404), a refused model name, a refused image, bad credentials and
  other 4xx. Fatal after the retries: not one reply from the server while they ran (it is dead,
  hung or unreachable), so a run against a dead endpoint fails in minutes, not hours.

Images go as ``data:`` URLs.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from PIL import Image

from ..errors import MmsaeError

DEFAULT_BASE_URL = "https://api.openai.com/v1"
CONNECT_TIMEOUT = 10.0  # seconds for TCP and TLS set-up, within the request's deadline


class FatalRequestError(MmsaeError):
    """The endpoint refused the request in a way no retry can fix (model name, image, auth), or never answered."""


class TransientRequestError(MmsaeError):
    """A request that failed after every retry (time-outs, 5xx, 429, malformed replies)."""


class RequestCancelled(Exception):
    """The client was closed while the request was waiting or in flight."""


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


def check_base_url(base_url: str, flag: str = "--base-url") -> urllib.parse.SplitResult:
    """The parts of an endpoint base URL; a one-line MmsaeError unless it is ``http(s)://host[:port][/path]``."""
    parts = urllib.parse.urlsplit(base_url.strip())
    if "@" in parts.netloc:  # checked first: the other messages would print the password
        raise MmsaeError(f"{flag} holds a user name or password; give the key with --api-key or $OPENAI_API_KEY instead")
    try:
        port_ok = parts.port is None or 0 < parts.port
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.query or parts.fragment:
        hint = f"did you mean http://{base_url.strip()}?" if "://" not in base_url else "give one like http://localhost:8000/v1"
        raise MmsaeError(f"{flag} {base_url!r} is not an http:// or https:// URL with a host; {hint}")
    return parts


@dataclass
class OpenAIClient:
    """POST ``{base_url}/chat/completions`` with bounded retries. Thread-safe (a connection per attempt)."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)  # never printed
    timeout: float = 60.0  # wall-clock seconds per attempt: connect, send and receive
    max_retries: int = 4
    backoff: float = 1.0  # first retry waits about this long, doubling each time
    max_backoff: float = 30.0
    total_timeout: float | None = None  # wall-clock seconds per chat() with its retries (None: 3 * timeout)
    temperature: float = 0.0
    max_tokens: int = 200
    url_flag: str = field(default="--base-url", repr=False)  # how errors name the base URL

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise MmsaeError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.max_retries < 0:
            raise MmsaeError(f"--max-retries must be 0 or more, got {self.max_retries}")
        parts = check_base_url(self.base_url, self.url_flag)
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._path = parts.path.rstrip("/") + "/chat/completions"
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()  # connections in flight, for close()
        self._closed = threading.Event()
        self._last_reply = float("-inf")  # monotonic time of the last HTTP reply, of any status

    @classmethod
    def from_env(cls, model: str | None, base_url: str | None = None, api_key: str | None = None, *,
                 needs: str = "the openai backend needs --model", url_flag: str = "--base-url", **options) -> OpenAIClient:
        """A client for ``base_url`` (else ``$OPENAI_BASE_URL``, else api.openai.com) with ``api_key``
        (else ``$OPENAI_API_KEY``) and ``model`` (else ``$OPENAI_MODEL``); ``options`` set the other
        fields. The one place that reads the environment; the base URL is checked here, at start-up."""
        model = model or os.environ.get("OPENAI_MODEL")
        if not model:
            raise MmsaeError(f"{needs} (the endpoint's model name) or $OPENAI_MODEL")
        return cls(base_url=base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL, model=model,
                   api_key=api_key or os.environ.get("OPENAI_API_KEY"), url_flag=url_flag, **options)

    def chat(self, messages: list[dict]) -> str:
        """The reply text of one chat completion, retrying transient failures within the budget."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        start = time.monotonic()
        budget_end = start + (self.total_timeout if self.total_timeout is not None else 3 * self.timeout)
        attempts, last = 0, ""
        while True:
            attempts += 1
            try:
                return self._attempt(body, min(time.monotonic() + self.timeout, budget_end))
            except _Retry as e:
                last, wait = str(e), e.retry_after
            delay = min(self.max_backoff, self.backoff * 2 ** (attempts - 1)) * (0.5 + random.random() / 2)
            delay = max(delay, min(wait or 0.0, self.max_backoff))
            if attempts > self.max_retries or time.monotonic() + delay >= budget_end:
                break
            if self._closed.wait(delay):  # close() cuts the wait short
                raise RequestCancelled
        if self._last_reply < start:  # not one reply from the server all this time: more retries will not help
            raise FatalRequestError(f"no reply from {self.base_url} in {time.monotonic() - start:.0f} s "
                                    f"({attempts} attempts; last: {last}); is the server up and {self.url_flag} right? "
                                    "(a slow model needs a longer --timeout)")
        raise TransientRequestError(f"{attempts} attempts failed; last: {last}")

    def close(self) -> None:
        """Cut the requests in flight short and refuse new ones (they raise :class:`RequestCancelled`)."""
        self._closed.set()
        with self._lock:
            for conn in list(self._open):
                _shut(conn)

    def _attempt(self, body: bytes, deadline: float) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        remaining = max(deadline - time.monotonic(), 0.001)
        connection = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        # a connect cannot be cut short from another thread (there is no socket to shut yet), so it gets
        # at most CONNECT_TIMEOUT: close() on Ctrl-C then waits no longer than that for a host that drops packets
        conn = connection(self._host, self._port, timeout=min(remaining, CONNECT_TIMEOUT))
        expired = threading.Event()

        def expire() -> None:  # the wall-clock deadline: shutting the socket down ends any blocked call
            expired.set()
            _shut(conn)

        watchdog = threading.Timer(remaining, expire)
        watchdog.daemon = True
        with self._lock:
            if self._closed.is_set():
                raise RequestCancelled
            self._open.add(conn)
        watchdog.start()
        connected = False
        try:
            conn.connect()
            if expired.is_set() or self._closed.is_set():  # while connecting, before there was a socket to shut
                raise TimeoutError
            connected = True
            conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))  # each socket call; the watchdog bounds them all
            conn.request("POST", self._path, body=body, headers=headers)
            response = conn.getresponse()
            status, raw = response.status, response.read()
        except ConnectionRefusedError as e:
            raise FatalRequestError(f"cannot connect to {self.base_url}: connection refused; is the server running? "
                                    f"({self.url_flag})") from e
        except socket.gaierror as e:
            if e.errno == socket.EAI_AGAIN:  # the resolver is busy: worth a retry
                raise _Retry(f"cannot resolve {self._host} yet: {e.strerror}") from None
            raise FatalRequestError(f"cannot resolve the host {self._host!r} of {self.base_url} ({e.strerror}); "
                                    f"check {self.url_flag}") from e
        except (OSError, http.client.HTTPException, ValueError) as e:  # time-out, reset, cut by the watchdog
            if self._closed.is_set():
                raise RequestCancelled from None
            if expired.is_set() or isinstance(e, TimeoutError):
                raise _Retry(f"no complete reply within {self.timeout:g} s" if connected else
                             f"no connection within {min(self.timeout, CONNECT_TIMEOUT):g} s") from None
            raise _Retry(f"connection error: {e or type(e).__name__}") from None
        finally:
            watchdog.cancel()
            conn.close()
            with self._lock:
                self._open.discard(conn)
        if expired.is_set():  # a reply cut short by the watchdog can look complete
            raise _Retry(f"no complete reply within {self.timeout:g} s")
        self._last_reply = time.monotonic()
        return self._reply_text(status, raw, response)

    def _reply_text(self, status: int, raw: bytes, response: http.client.HTTPResponse) -> str:
        if 300 <= status < 400:
            raise FatalRequestError(f"the server redirected to {response.getheader('Location') or '(no Location)'} "
                                    f"(HTTP {status}); mmsae does not follow redirects, so the key stays with "
                                    f"{self._origin}; set {self.url_flag} to the final URL")
        if status >= 400:
            detail = _error_message(raw, response.reason)
            if status == 429 or status >= 500:
                raise _Retry(f"HTTP {status}: {detail}", _seconds(response.getheader("Retry-After")))
            raise self._fatal(status, detail)
        try:
            text = json.loads(raw)["choices"][0]["message"]["content"]
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
        if "model" in low:
            return FatalRequestError(f"{self.base_url} refused the model name {self.model!r} (HTTP {code}: {detail}); "
                                     "check --model against the server's /models list")
        if code == 404:
            return FatalRequestError(f"endpoint not found: {self._origin}{self._path} (HTTP 404: {detail}); "
                                     f"check {self.url_flag} (it usually ends in /v1)")
        return FatalRequestError(f"{self.base_url} refused the request (HTTP {code}: {detail})")


class _Retry(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _shut(conn: http.client.HTTPConnection) -> None:
    """Shut a connection's socket down from another thread: a blocked read or write returns at once.

    The plain socket method, also for TLS: ``SSLSocket.shutdown`` would drop the TLS state under
    the thread that is reading."""
    sock = conn.sock
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:  # closed already, or never connected
            pass


def _error_message(raw: bytes, reason: str) -> str:
    try:
        data = json.loads(raw)
        msg = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        return " ".join(str(msg).split())[:200]
    except ValueError:
        return " ".join(raw[:200].decode("utf-8", "replace").split()) or reason


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
