"""The fal emulator's HTTPS side: a threaded TLS server on loopback and the request handler.

The handler maps each request to a route (submit, status and its event stream, result, cancel, token,
upload, file),
acts out an injected fault if one is due (HTTP errors, resets, stalls, malformed or huge bodies),
checks the ``Authorization`` header, and answers with what the ``FalEmulator`` returns. The state
itself (jobs, files, faults, recordings) lives in the emulator; this module only speaks HTTP.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import sys
import threading
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from ._jobs import REQUEST_PATH, EventStream, Fault, Reply

if TYPE_CHECKING:
    from ._emulator import FalEmulator

__all__ = ["Handler", "TLSServer"]

MAX_STALL_S = 60.0
MAX_BODY = 256 * 1024 * 1024


def _no_route(method: str, path: str) -> None:
    raise Reply(404, {"detail": f"No route for {method} {path}"})


class TLSServer(ThreadingHTTPServer):
    """A threaded HTTP server doing the TLS handshake in each connection's own thread."""

    daemon_threads = True
    request_queue_size = 128
    context: ssl.SSLContext
    emulator: FalEmulator

    def server_bind(self) -> None:
        # The earliest hook of TCPServer.__init__: the live-connection set must exist before serving.
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().server_bind()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # Handshake here (a worker thread), not in accept(): a slow client cannot block the others.
        request.settimeout(30)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except OSError:  # ssl.SSLError included: a client that gave up or did not trust us
            return
        with self.connections_lock:
            self.connections.add(tls)
        try:
            self.RequestHandlerClass(tls, client_address, self)
        except OSError:
            pass  # the client went away mid-answer
        finally:
            with self.connections_lock:
                self.connections.discard(tls)
            tls.close()

    def close_connections(self) -> None:
        with self.connections_lock:
            live = list(self.connections)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Client disconnects are expected under fault injection; anything else is an emulator bug."""
        if not isinstance(sys.exc_info()[1], OSError):
            traceback.print_exc()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TLSServer
    #: The route of the request being answered (recorded with the answer); None before it is known.
    route: str | None = None

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the emulator records requests in ``emu.log`` instead."""

    def _dispatch(self) -> None:
        emu, self.route = self.server.emulator, None
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            self._send(413, {"detail": "Request body too large"})
            return
        body = self.rfile.read(length) if length else b""
        route, scheme, answer = self._route(body)
        self.route = route
        # Faults act before authentication, like an overloaded ingress in front of fal would.
        fault = emu._take_fault(route) if route else None
        if fault is not None and self._apply_fault(fault):
            return
        headers: dict[str, str] = {}
        try:
            self._check_auth(scheme)
            status, reply = 200, answer()
        except Reply as early:
            status, reply, headers = early.status, early.body, early.headers
        except Exception as exc:  # an emulator bug: say so loudly instead of dropping the connection
            traceback.print_exc()
            status, reply = 500, {"detail": f"fal emulator error: {exc!r}"}
        if isinstance(reply, EventStream):
            self._send_events(reply)
            return
        if isinstance(reply, tuple):  # a file: (content type, bytes)
            headers, reply = {**headers, "Content-Type": reply[0]}, reply[1]
        self._send(status, reply, headers)

    do_GET = do_POST = do_PUT = _dispatch

    def _route(self, body: bytes) -> tuple[str | None, str, Callable[[], Any]]:
        """(fault route, auth scheme wanted, callable producing the answer) for one request."""
        emu, method, parts = self.server.emulator, self.command, urlsplit(self.path)
        path, content_type = parts.path, self.headers.get("Content-Type")
        if method == "PUT" and path.startswith("/files/upload/put/"):
            return None, "", lambda: emu._put_upload(path.rsplit("/", 1)[1], content_type, body)
        if method == "GET" and path.startswith("/files/"):
            return "file", "", lambda: emu._file(path.removeprefix("/files/"))
        if method == "POST" and path == "/storage/auth/token":
            return "token", "Key", emu._token
        if method == "POST" and path == "/files/upload":
            return "upload", "Bearer", lambda: emu._upload(content_type or "application/octet-stream", body)
        if method == "POST" and path == "/storage/upload/initiate":
            return "upload", "Key", lambda: emu._initiate_upload(body)
        match = REQUEST_PATH.match(path)
        with_logs = parse_qs(parts.query).get("logs", ["0"])[0].lower() in ("1", "true")
        if match and method == "GET" and match["tail"] == "/status":
            return "status", "Key", lambda: emu._status(emu._job(match["id"]), with_logs)
        if match and method == "GET" and match["tail"] == "/status/stream":
            # The stream is a form of the status route: a status fault hits it as well.
            return "status", "Key", lambda: emu._status_stream(emu._job(match["id"]), with_logs)
        if match and method == "GET" and not match["tail"]:
            return "result", "Key", lambda: emu._result(emu._job(match["id"]))
        if match and method == "PUT" and match["tail"] == "/cancel":
            return "cancel", "Key", lambda: emu._cancel(emu._job(match["id"]))
        if method == "POST" and path.count("/") >= 2:
            headers = {k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"}
            return "submit", "Key", lambda: emu._submit(path, body, headers)
        return None, "", lambda: _no_route(method, path)

    def _check_auth(self, scheme: str) -> None:
        emu, given = self.server.emulator, self.headers.get("Authorization") or ""
        if scheme == "Key" and given != f"Key {emu.key}":
            raise Reply(401, {"detail": "Authentication is required: invalid or missing key"})
        if scheme == "Bearer":
            kind, _, token = given.partition(" ")
            with emu._lock:
                known = token in emu._tokens
            if kind != "Bearer" or not known:
                raise Reply(401, {"detail": "Invalid CDN token"})

    def _apply_fault(self, fault: Fault) -> bool:
        """Act out ``fault``; True when the request has been fully answered (or dropped)."""
        emu, params = self.server.emulator, fault.params
        if fault.kind == "http":
            status, body = int(params.get("status", 500)), params.get("body")
            body = body if body is not None else {"detail": f"Injected HTTP {status}"}
            content_type = "text/html" if isinstance(body, str) else "application/json"
            raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self._send(status, raw, {"Content-Type": content_type, **params.get("headers", {})})
        elif fault.kind == "reset":
            self._reset()
        elif fault.kind == "malformed":
            self._send(200, b'{"status": "COMPLETED", "images": [{"url": ')
        elif fault.kind == "not_found":
            self._send(404, {"detail": "Not found"})
        elif fault.kind == "huge":
            self._send_huge(int(params.get("size", 8 * 2**20)), bool(params.get("declare_length", True)))
        elif fault.kind == "stall":  # then answer normally; close() wakes it early
            emu._closing.wait(min(max(float(params.get("seconds", 1.0)), 0.0), MAX_STALL_S))
            return False
        else:  # completed_error, stuck_in_queue: change the job, then answer normally
            emu._mark(fault, urlsplit(self.path).path)
            return False
        return True

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(raw)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(raw)
        self.server.emulator._record(self.command, self.path, status, self.route)

    def _send_events(self, stream: EventStream) -> None:
        """A ``text/event-stream`` in HTTP chunks, one ``data:`` event per status; the connection stays
        usable after the last chunk, as fal's ingress keeps it alive."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.server.emulator._record(self.command, self.path, 200, self.route)
        try:
            for event in stream.events:
                data = f"data: {json.dumps(event)}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True  # the client went away mid-stream

    def _send_huge(self, size: int, declare_length: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if declare_length:
            self.send_header("Content-Length", str(size))
        else:  # length unknown: the body ends when the connection closes
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.server.emulator._record(self.command, self.path, 200, self.route)
        chunk, sent = b"\x89PNG" + bytes(64 * 1024 - 4), 0
        try:
            while sent < size and not self.server.emulator._closing.is_set():
                self.wfile.write(chunk[: size - sent])
                sent += min(len(chunk), size - sent)
        except OSError:
            self.close_connection = True  # the client stopped reading: that is the point

    def _reset(self) -> None:
        """Drop the connection without an answer: SO_LINGER 0 makes close() send a TCP RST."""
        self.server.emulator._record(self.command, self.path, 0, self.route)
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()
