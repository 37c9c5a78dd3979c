"""Connection plumbing of the web server: the request-head gate and socket readers/writers.

The server hands every accepted connection to :class:`HeaderGate`, which waits for the request head
in one selector thread; only complete heads reach a worker (``server.dispatch``), so slow or idle
clients never hold one.
"""

from __future__ import annotations

import io
import json
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

__all__ = ["HeaderGate", "PrefixedSocket", "SocketWriter", "quick_answer"]


def quick_answer(sock: socket.socket, status: HTTPStatus, message: str, extra: str = "") -> None:
    """A complete JSON answer written without a handler (the connection is about to be closed)."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.0 {status.value} {status.phrase}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.settimeout(1.0)
        sock.sendall(head + body)
    except OSError:
        pass


@dataclass
class _Arriving:
    address: Any
    deadline: float
    head: bytearray


class HeaderGate:
    """One thread waits for the request head of every new connection, then hands it to the worker pool.

    Slow or idle clients (a few bytes now and then, "slowloris") thus hold a cheap selector entry, not
    a worker; past ``header_timeout_s`` they get 408 and are closed. At most ``max_connections`` wait
    here at once (beyond: 503).
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        self.limits = server.limits
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._incoming: "queue.SimpleQueue[tuple[socket.socket, Any]]" = queue.SimpleQueue()
        self._count = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tag2mask-http-gate", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, address: Any) -> bool:
        with self._lock:
            if self._count >= self.limits.max_waiting_heads:
                return False
            self._count += 1
        self._incoming.put((sock, address))
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        return True

    def stop(self) -> None:
        self._stopped.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _drop(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        with self._lock:
            self._count -= 1

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                for key, _ in self._selector.select(timeout=0.2):
                    if key.data is None:
                        self._accept_new()
                    else:
                        self._read(key.fileobj, key.data)
                self._expire()
        finally:
            for key in list(self._selector.get_map().values()):
                if key.data is not None:
                    self.server.shutdown_request(key.fileobj)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept_new(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                sock, address = self._incoming.get_nowait()
            except queue.Empty:
                return
            sock.setblocking(False)
            deadline = time.monotonic() + self.limits.header_timeout_s
            self._selector.register(sock, selectors.EVENT_READ, _Arriving(address, deadline, bytearray()))

    def _read(self, sock: socket.socket, arriving: _Arriving) -> None:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client gave up
            self._drop(sock)
            self.server.shutdown_request(sock)
            return
        arriving.head += chunk
        if b"\r\n\r\n" in arriving.head or b"\n\n" in arriving.head:
            self._drop(sock)
            sock.setblocking(True)
            self.server.dispatch(sock, arriving.address, bytes(arriving.head))
        elif len(arriving.head) > self.limits.max_header_bytes:
            self._drop(sock)
            quick_answer(sock, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                          f"the request head is larger than {self.limits.max_header_bytes:,} bytes")
            self.server.shutdown_request(sock)

    def _expire(self) -> None:
        now = time.monotonic()
        late = [key for key in self._selector.get_map().values() if key.data is not None and key.data.deadline <= now]
        for key in late:
            self._drop(key.fileobj)
            quick_answer(key.fileobj, HTTPStatus.REQUEST_TIMEOUT,
                          f"the request head did not arrive within {self.limits.header_timeout_s:g} s")
            self.server.shutdown_request(key.fileobj)


class PrefixedSocket(io.RawIOBase):
    """Reads the bytes the gate already took off the socket, then the socket itself."""

    def __init__(self, prefix: bytes, sock: socket.socket) -> None:
        self._prefix = memoryview(prefix)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        return self._sock.recv_into(buffer)


class SocketWriter(io.RawIOBase):
    """``wfile``: every write is sent whole (``sendall``)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        return len(data)
