"""A loopback image host that fails each URL's first request the way busy hosts do, and keeps
its own record of what arrived when (its clock, not the test's)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# The first request to /<mode>/<name> fails like this; later ones get the image. "reset": the
# connection is reset before any answer; "cut": reset halfway through the image.
MODES = ("503", "429", "reset", "cut")


@dataclass(frozen=True)
class Arrival:
    path: str
    at: float  # time.monotonic() on the host, when the request line was read
    headers: dict[str, str]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the test measures the fetcher's manners, not the host's backlog


class FlakyHost:
    """/<mode>/<name>  mode 503, 429 (with Retry-After: 1), reset or cut: the first request fails so,
                       the next ones serve the image; mode ok: always served
    /always503/<name>  503 every time
    /status/<code>     that status, every time
    /to/<key>          302 to ``redirects[key]`` (an absolute URL, on another host perhaps)
    Each response is held ``hold_s`` seconds first, so that simultaneous requests overlap."""

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.images: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.hold_s = 0.0
        self.arrivals: list[Arrival] = []
        self.active = 0
        self.most_active = 0  # the most requests it ever held at once, between arrival and answer
        self._lock = threading.Lock()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with host._lock:
                    earlier = sum(1 for a in host.arrivals if a.path == self.path)
                    host.arrivals.append(Arrival(self.path, time.monotonic(), dict(self.headers.items())))
                    host.active += 1
                    host.most_active = max(host.most_active, host.active)
                try:
                    if host.hold_s:
                        time.sleep(host.hold_s)
                finally:
                    # Counted until the answer starts, not until this thread is done with it: a
                    # client may read the answer and send its next request before this thread
                    # runs again, and that is one request at a time, not two.
                    with host._lock:
                        host.active -= 1
                self._answer(earlier == 0)

            def _answer(self, first: bool) -> None:
                parts = self.path.strip("/").split("/")
                if len(parts) != 2:
                    return self._send(404)
                mode, name = parts
                if mode == "status":
                    return self._send(int(name))
                if mode == "to" and name in host.redirects:
                    return self._send(302, headers={"Location": host.redirects[name]})
                if name not in host.images:
                    return self._send(404)
                if mode == "always503" or (first and mode == "503"):
                    return self._send(503)
                if first and mode == "429":
                    return self._send(429, headers={"Retry-After": "1"})
                if first and mode in ("reset", "cut"):
                    if mode == "cut":
                        body = host.images[name]
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                    # SO_LINGER 0: close() sends a RST, as an overwhelmed server or proxy does.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return None
                if mode in ("ok", *MODES):
                    return self._send(200, host.images[name])
                return self._send(404)

            def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = _Server((address, 0), Handler)
        self.base = f"http://{address}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def add(self, name: str, data: bytes, mode: str = "ok") -> str:
        self.images[name] = data
        return f"{self.base}/{mode}/{name}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}"

    def times(self, url: str) -> list[float]:
        """When requests for ``url`` arrived, by the host's clock."""
        path = urlsplit(url).path
        with self._lock:
            return [a.at for a in self.arrivals if a.path == path]

    def header_sent(self, url: str, name: str) -> list[str | None]:
        """The ``name`` header of each request for ``url``'s path (whatever host name it used)."""
        path = urlsplit(url).path
        with self._lock:
            return [a.headers.get(name) for a in self.arrivals if a.path == path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
