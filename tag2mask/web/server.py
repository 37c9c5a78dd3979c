"""A small web demo: upload an image, type class names, get an overlay (standard library only).

``tag2mask serve`` starts it. The page posts a form to ``/segment`` and shows the overlay (opacity,
per-class toggles, a mask download, optionally every method side by side). ``/api/segment`` answers
the same form with JSON::

    {"label_png": "<base64 VOC-palette PNG, pixel value = index into class_names>",
     "class_names": ["background", "cat", ...], "present": ["cat"], "size": [H, W], "method": "naclip",
     "mode": "whole", "processed_size": [h, w] or null, "results": [{"method", "label_png", "present", "seconds"}, ...],
     "toy_model": false, "note": null, "unavailable": {"scclip": "SC-CLIP ... needs a ViT with at least 11 blocks ..."}}

``results`` has one entry per method (all of them with ``compare=1``). ``GET /api/methods`` lists the methods
this server offers for its model (``{"methods": [...], "default": ..., "unavailable": {method: reason},
"toy_model": ...}``); the page names the unavailable ones with their reason. Errors are
``{"error": "..."}`` with a 4xx/5xx status (an HTML page with the message for ``/segment``).

Limits and defences (docs/security.md): uploads up to ``max_upload_bytes`` with an exact
``Content-Length``; images up to 16 MP (segmented at most at 4 MP); inline class lists only (a
request never names a file); request heads are gathered by one selector thread and must arrive
within ``header_timeout_s`` (slow clients never hold a worker), bodies within ``request_timeout_s``;
a bounded worker pool behind a listen backlog, ``503`` beyond it; requests whose ``Host`` is not the
bound address or a loopback name, and cross-site browser posts (``Origin`` / ``Sec-Fetch-Site``), are
refused with 403 (DNS rebinding, CSRF).
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import re
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Iterable, Mapping, Optional
from urllib.parse import urlsplit

from tag2mask.io.palette import encode_label_png
from tag2mask.web.connections import HeaderGate, PrefixedSocket, SocketWriter, quick_answer
from tag2mask.web.multipart import parse_multipart
from tag2mask.web.page import FormState, render_page
from tag2mask.web.service import (
    TOY_MODEL_NOTE,
    RequestError,
    SegmentService,
    decode_upload,
    parse_classes,
)

__all__ = ["ServerLimits", "SegmentServer", "make_server", "parse_multipart", "RequestError", "ServerBindError"]

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_STEM = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class ServerLimits:
    """How much one client may ask of the server (see the module docstring)."""

    max_upload_bytes: int = MAX_UPLOAD_BYTES
    header_timeout_s: float = 10.0  # the request line and headers must arrive within this
    request_timeout_s: float = 60.0  # the body must arrive within this once a worker reads it
    idle_timeout_s: float = 10.0  # one read or write may wait at most this long
    max_header_bytes: int = 64 * 1024
    max_waiting_heads: int = 512  # connections still sending their head; beyond that: 503
    workers: int = 8  # requests read and answered at once (computation itself is one at a time)
    max_pending: int = 64  # complete heads waiting for a worker; beyond that: 503
    backlog: int = 128  # the listen queue of the socket
    drain_bytes: int = 64 * 1024 * 1024  # an unread body is read and dropped up to this much, so the client sees the answer


def _host_name(value: str) -> str:
    """``Host``/netloc -> the bare host name, lower case (``[::1]:80`` -> ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: "SegmentServer"
    server_version = "tag2mask"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: simple, and no idle keep-alive sockets
    default_request_version = "HTTP/1.0"  # answers to garbled request lines still carry a status line

    # ---- connection life cycle ------------------------------------------------------------------

    def setup(self) -> None:
        self.connection = self.request
        self.connection.settimeout(self.server.limits.idle_timeout_s)
        self.rfile = io.BufferedReader(PrefixedSocket(self.server.take_head(self.connection), self.connection), 1 << 16)
        self.wfile = SocketWriter(self.connection)
        self._unread = 0  # body bytes the client may still be sending when we answer early

    def finish(self) -> None:
        try:
            self.wfile.close()
            self.rfile.close()
        finally:
            if self._unread:
                self._drain()

    def _drain(self) -> None:
        """Read and drop what the client is still sending (bounded), so it gets to read our answer."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            left, deadline = min(self._unread, self.server.limits.drain_bytes), time.monotonic() + 5.0
            while left > 0 and time.monotonic() < deadline:
                chunk = self.connection.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - requests are not logged
        pass

    # ---- answers --------------------------------------------------------------------------------

    def _is_api(self) -> bool:
        return getattr(self, "path", "").split("?", 1)[0].startswith("/api/")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        if getattr(self, "_allow", None):
            self.send_header("Allow", self._allow)
        if content_type.startswith("text/html"):
            # the page's own inline script and data: images only; no framing by other sites
            self.send_header("Content-Security-Policy", "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                             "script-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _page(self, status: int, state: Optional[FormState] = None, error: Optional[str] = None, **results: Any) -> None:
        service = self.server.service
        if status == HTTPStatus.OK and state is None and error is None and not results:
            # the page as first opened: a sample scene with the default classes, so the controls have
            # something to show before the first upload
            form = FormState(method=service.methods[0])
            image, sample = service.sample(form.classes, form.method)
            results = {"image": image, "results": sample, "stem": "sample", "sample": True}
        body = render_page(state or FormState(method=service.methods[0]), service.methods, service.describe_model(),
                           note=TOY_MODEL_NOTE if service.toy_model else None, error=error,
                           unavailable=service.unavailable, **results)
        self._send(status, body, "text/html; charset=utf-8")

    def _error(self, status: int, message: str, state: Optional[FormState] = None) -> None:
        if self._is_api() or not getattr(self, "command", None):
            self._json(status, {"error": message})
        else:
            self._page(status, state, error=message)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """http.server's own errors (bad request line, unsupported method) in our formats."""
        self.close_connection = True
        text = message or HTTPStatus(code).phrase
        if code == HTTPStatus.NOT_IMPLEMENTED and getattr(self, "command", None):
            # a method we do not serve (PUT, DELETE, OPTIONS ...): 405 with the methods we do
            self._method_not_allowed()
            return
        try:
            if getattr(self, "command", None) and getattr(self, "path", None) is not None:
                self._error(code, text)
            else:
                self._json(code, {"error": text})
        except OSError:
            pass

    def _method_not_allowed(self) -> None:
        path = getattr(self, "path", "/").split("?", 1)[0]
        self._allow = "GET, HEAD" if path == "/api/methods" else "POST" if path.startswith("/api/") else "GET, HEAD, POST"
        self._unread = self.server.limits.drain_bytes
        try:
            self._json(HTTPStatus.METHOD_NOT_ALLOWED,
                       {"error": f"method {str(self.command)[:20]!r} is not allowed here; allowed: {self._allow}"})
        except OSError:
            pass

    # ---- checks ---------------------------------------------------------------------------------

    def _host_allowed(self, name: str) -> bool:
        server = self.server
        return name in server.allowed_hosts or (server.any_address and _is_ip(name))

    def _check_origin(self) -> Optional[str]:
        """A reason to refuse the request (foreign Host, cross-site browser request), or None."""
        host = self.headers.get("Host")
        if host is not None and not self._host_allowed(_host_name(host)):
            return (f"Host {host[:80]!r} is not served here (DNS-rebinding guard); use http://127.0.0.1:"
                    f"{self.server.server_port}/ or start the server with --allow-host NAME")
        if self.command != "POST":
            return None
        origin = self.headers.get("Origin")
        if origin is not None:
            try:
                parts = urlsplit(origin) if origin != "null" else None
                port = (parts.port or {"http": 80, "https": 443}.get(parts.scheme)) if parts is not None else None
            except ValueError:  # "http://[::1", "http://h:99999": malformed, so not our own page
                return f"malformed Origin {origin[:80]!r} refused (CSRF guard)"
            if parts is None or not parts.hostname or not self._host_allowed(parts.hostname.lower()) or (
                    port != self.server.server_port):
                return f"cross-site request from {origin[:80]!r} refused (CSRF guard)"
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return f"cross-site request ({site}) refused (CSRF guard)"
        return None

    def _read_body(self) -> bytes:
        limits = self.server.limits
        if self.headers.get("Transfer-Encoding"):
            self._unread = limits.drain_bytes
            raise RequestError("chunked uploads are not accepted; send the form with a Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._unread = limits.drain_bytes  # an HTTP/1.0 client may still send a body until it closes
            raise RequestError("the request has no Content-Length header")
        if not raw.strip().isdigit():
            self._unread = limits.drain_bytes
            raise RequestError(f"invalid Content-Length {raw[:40]!r}: expected a non-negative whole number of bytes")
        length = int(raw)
        if length > limits.max_upload_bytes:
            self._unread = length
            raise RequestError(f"the upload has {length:,} bytes; at most {limits.max_upload_bytes:,} are accepted",
                               status=413)
        self._unread = length
        chunks, got = [], 0
        deadline = time.monotonic() + limits.request_timeout_s
        try:
            while got < length:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestError(f"the upload did not arrive within {limits.request_timeout_s:g} s", status=408)
                self.connection.settimeout(min(limits.idle_timeout_s, left))  # each read, and all of them, are bounded
                chunk = self.rfile.read1(min(length - got, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
                self._unread = length - got
        except TimeoutError:
            raise RequestError("the upload stalled; send the whole request at once", status=408) from None
        finally:
            self.connection.settimeout(limits.idle_timeout_s)
        if got < length:
            raise RequestError(f"the upload ended after {got:,} of {length:,} bytes")
        return b"".join(chunks)

    # ---- methods --------------------------------------------------------------------------------

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except TimeoutError:
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        refused = self._check_origin()
        if refused:
            self._error(HTTPStatus.FORBIDDEN, refused)
        elif self.path.split("?", 1)[0] == "/api/segment":
            self._method_not_allowed()  # the API takes POST only
        elif self.path.split("?", 1)[0] == "/api/methods":
            self._json(HTTPStatus.OK, self.server.service.method_list())
        elif self.path.split("?", 1)[0] in ("/", "/index.html"):
            self._page(HTTPStatus.OK)
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no page {self.path[:80]!r} here; the form is at /")

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        refused = self._check_origin()
        if refused:
            self._unread = self.server.limits.drain_bytes
            self._error(HTTPStatus.FORBIDDEN, refused)
            return
        if path == "/api/methods":
            self._method_not_allowed()  # a list to GET
            return
        if path not in ("/segment", "/api/segment"):
            self._unread = self.server.limits.drain_bytes
            self._error(HTTPStatus.NOT_FOUND, f"nothing to post to at {path[:80]!r}; use /segment or /api/segment")
            return
        state = FormState()
        try:
            fields = parse_multipart(self.headers.get("Content-Type", ""), self._read_body())
            state = FormState(classes=str(fields.get("classes", "")),
                              method=str(fields.get("method", self.server.service.methods[0])),
                              mode=str(fields.get("mode", "whole")),
                              compare=str(fields.get("compare", "")).lower() in ("1", "on", "true", "yes"))
            image = decode_upload(fields.get("image") or b"")
            vocab = parse_classes(state.classes)
            methods = list(self.server.service.methods) if state.compare else [state.method]
            results, processed = self.server.service.segment(image, vocab, methods, state.mode)
        except RequestError as e:
            self._error(e.status, str(e), state)
            return
        except Exception:  # a bug or out of memory: answer, log for the operator, keep serving
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error while segmenting (details are in the "
                        "server's log)", state)
            return
        if path == "/api/segment":
            self._json(HTTPStatus.OK, self._api_payload(image, results, processed, state))
        else:
            stem = _STEM.sub("_", str(fields.get("image.filename", "image")).rsplit(".", 1)[0])[:60] or "image"
            self._page(HTTPStatus.OK, state, image=image, results=results, processed_size=processed, stem=stem)

    def _api_payload(self, image, results, processed, state: FormState) -> dict:
        encoded = [{"method": r.method, "label_png": base64.b64encode(encode_label_png(r.label)).decode(),
                    "present": r.present, "seconds": r.seconds} for r in results]
        toy = self.server.service.toy_model
        return {"label_png": encoded[0]["label_png"], "class_names": list(results[0].class_names),
                "present": encoded[0]["present"], "size": [image.height, image.width], "method": results[0].method,
                "mode": state.mode, "processed_size": list(processed) if processed else None, "results": encoded,
                "toy_model": toy, "note": TOY_MODEL_NOTE if toy else None,
                "unavailable": dict(self.server.service.unavailable)}


class ServerBindError(OSError):
    """The server cannot listen on the address asked for (port in use, unknown host, no permission)."""

    def __init__(self, address: tuple[str, int], cause: OSError) -> None:
        why = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno or 0, f"cannot listen on {address[0]}:{address[1]}: {why} (choose another "
                                           "--port, or check --host)")

    def __str__(self) -> str:  # one line, without the "[Errno 98]" prefix
        return str(self.args[1])


class SegmentServer(HTTPServer):
    """An HTTP server: request heads gathered by one selector thread, then a bounded worker pool.

    The listen backlog is ``limits.backlog``; connections beyond ``workers + max_pending`` in the pool
    (or ``max_waiting_heads`` still sending their head) get an immediate 503.
    """

    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: SegmentService, limits: Optional[ServerLimits] = None,
                 allowed_hosts: Iterable[str] = ()) -> None:
        self.limits = limits or ServerLimits()
        self.request_queue_size = self.limits.backlog
        self.service = service
        self.gate: Optional[HeaderGate] = None  # server_close may run before it exists (a failed bind)
        self.pool: Optional[ThreadPoolExecutor] = None
        try:
            super().__init__(address, _Handler)
        except OSError as exc:  # busy port, unknown host, no permission: one line, not a traceback
            raise ServerBindError(address, exc) from None
        bound = _host_name(address[0]) if address[0] else "0.0.0.0"
        self.any_address = bound in ("0.0.0.0", "::", "")
        self.allowed_hosts = {*LOOPBACK_NAMES, bound, *(h.strip().lower() for h in allowed_hosts if h.strip())}
        self.pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="tag2mask-http")
        self._slots = threading.BoundedSemaphore(self.limits.workers + self.limits.max_pending)
        self._heads: dict[socket.socket, bytes] = {}
        self._heads_lock = threading.Lock()
        self.gate = HeaderGate(self)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self.gate.add(request, client_address):
            quick_answer(request, HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy; try again in a few seconds",
                          "Retry-After: 5\r\n")
            self.shutdown_request(request)

    def dispatch(self, request: socket.socket, client_address: Any, head: bytes) -> None:
        """Called by the gate once the request head is in: queue the connection for a worker."""
        if not self._slots.acquire(blocking=False):
            quick_answer(request, HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy; try again in a few seconds",
                          "Retry-After: 5\r\n")
            self.shutdown_request(request)
            return
        with self._heads_lock:
            self._heads[request] = head
        try:
            self.pool.submit(self._serve, request, client_address)
        except RuntimeError:  # the pool is shutting down
            self.take_head(request)
            self._slots.release()
            self.shutdown_request(request)

    def take_head(self, request: socket.socket) -> bytes:
        with self._heads_lock:
            return self._heads.pop(request, b"")

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # the client went away: nothing to report
        print(f"tag2mask serve: error while serving {client_address}:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)

    def server_close(self) -> None:
        super().server_close()
        if self.gate is not None:
            self.gate.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def make_server(model: Any, host: str = "127.0.0.1", port: int = 7860, description: Optional[str] = None, *,
                limits: Optional[ServerLimits] = None, allowed_hosts: Iterable[str] = (),
                short_side: int = 448, inputs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> SegmentServer:
    """A ready (not yet serving) server; ``port=0`` picks a free port (``server.server_address``).

    ``inputs``: the methods' start-up inputs (:class:`~tag2mask.web.service.SegmentService`); the methods
    offered are ``server.service.methods``. ``description`` is accepted for compatibility and ignored: the
    page describes the model by its architecture, never by a server path.
    """
    return SegmentServer((host, port), SegmentService(model, short_side=short_side, inputs=inputs), limits,
                         allowed_hosts)
