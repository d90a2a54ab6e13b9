"""Test servers on 127.0.0.1: their life (a free port, a daemon thread, a context manager) and the
JSON answers of their request handlers, with the bearer-key check every OpenAI-style server makes."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer(ThreadingHTTPServer):
    """An HTTP server on a free loopback port, serving from a daemon thread while in ``with``."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """The OpenAI-style API root, as a job's ``api.base_url``."""
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class JsonHandler(BaseHTTPRequestHandler):
    """A request handler that answers JSON; its server has a ``key`` every request must carry."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def authorised_body(self) -> dict | None:
        """The request's JSON body, or None after answering 401 to a request without the key."""
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length))
        if self.headers.get("authorization") != f"Bearer {self.server.key}":
            self._json(401, {"error": {"message": "Incorrect API key provided"}})
            return None
        return body

    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._raw(status, json.dumps(payload).encode(), headers)

    def _raw(self, status: int, data: bytes, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a test's timeout, a dropped connection): nothing to tell it
