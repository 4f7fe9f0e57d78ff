"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's server), for tests.

    proxy = FaultProxy(moto_url).start()
    proxy.fail(503, first=3, method="GET")       # the first 3 GETs answer 503, then all pass
    proxy.fail(500, rate=0.2)                    # a random 20% of requests answer 500
    proxy.slow(1.5, first=2, method="GET")       # the first 2 GETs wait 1.5 s before forwarding
    proxy.fail(403, path="corpus/b.parquet")     # every request for that object is denied
    opts = proxy.storage_options(base_options)   # the same options, pointed at the proxy

Faults are decided *before* a request is forwarded, so an injected error never hides a
request that moto executed (that would be a lost response, a different fault).
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_CODES = {403: "AccessDenied", 404: "NoSuchKey", 500: "InternalError", 503: "ServiceUnavailable"}
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


@dataclass
class Rule:
    """One fault: an error status or a delay, for matching requests (first N, or a random rate).

    ``after=True``: the request is forwarded (and executed) first, then its response is replaced
    by the error: a lost response, the ambiguous case for a client.
    """

    status: int | None = None
    delay: float = 0.0
    after: bool = False
    first: int | None = None
    rate: float | None = None
    method: str | None = None
    path: str | None = None
    seen: int = 0
    applied: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path is None or self.path in path)

    def fires(self) -> bool:
        self.seen += 1
        if self.first is not None and self.seen > self.first:
            return False
        if self.rate is not None and self.rng.random() >= self.rate:
            return False
        self.applied += 1
        return True


class FaultProxy:
    """Forwards HTTP/1.1 requests to ``upstream`` unless a rule injects an error or a delay."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ------------------------------------------------------------------ configuration

    def start(self) -> FaultProxy:
        """Serve in a background thread; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    def fail(self, status: int, *, first: int | None = None, rate: float | None = None,
             method: str | None = None, path: str | None = None, seed: int = 0) -> Rule:
        """Answer ``status`` (an S3 error document) to matching requests."""
        return self._add(Rule(status=status, first=first, rate=rate, method=method, path=path,
                              rng=random.Random(seed)))

    def lose(self, status: int = 503, *, first: int | None = None, rate: float | None = None,
             method: str | None = None, path: str | None = None, seed: int = 0) -> Rule:
        """Forward matching requests, then answer ``status`` instead of the real response."""
        return self._add(Rule(status=status, after=True, first=first, rate=rate, method=method, path=path,
                              rng=random.Random(seed)))

    def slow(self, seconds: float, *, first: int | None = None, rate: float | None = None,
             method: str | None = None, path: str | None = None, seed: int = 0) -> Rule:
        """Wait ``seconds`` before forwarding matching requests."""
        return self._add(Rule(delay=seconds, first=first, rate=rate, method=method, path=path,
                              rng=random.Random(seed)))

    def clear(self) -> None:
        """Remove every rule."""
        with self.lock:
            self.rules.clear()

    def _add(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def storage_options(self, options: dict[str, str]) -> dict[str, str]:
        """``options`` with the S3 endpoint replaced by this proxy."""
        return {**options, "aws_endpoint": self.url}

    @property
    def injected(self) -> int:
        """Faults injected so far (errors and delays)."""
        with self.lock:
            return sum(r.applied for r in self.rules)

    # ------------------------------------------------------------------ serving

    def _decide(self, method: str, path: str) -> tuple[int | None, float, bool]:
        status, delay, after = None, 0.0, False
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path) and rule.fires():
                    if rule.status is not None and status is None:
                        status, after = rule.status, rule.after
                    delay += rule.delay
        return status, delay, after

    def _error(self, h: BaseHTTPRequestHandler, status: int) -> None:
        with self.lock:
            self.log.append((h.command, h.path, status))
        payload = b"" if h.command == "HEAD" else (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{_CODES.get(status, "Error")}</Code>'
            f"<Message>injected by FaultProxy</Message><Resource>{h.path}</Resource>"
            f"<RequestId>fault</RequestId></Error>"
        ).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/xml")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        body = self._read_body(h)
        status, delay, after = self._decide(h.command, h.path)
        if delay:
            time.sleep(delay)
        if status is not None and not after:
            self._error(h, status)
            return
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if status is not None:  # executed upstream, but the client never hears of it
                self._error(h, status)
                return
            with self.lock:
                self.log.append((h.command, h.path, resp.status))
            h.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() in _HOP or (key.lower() == "content-length" and h.command != "HEAD"):
                    continue
                h.send_header(key, value)
            if h.command != "HEAD":
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
        finally:
            conn.close()

    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""
