"""A loopback HTTP proxy that forwards every request to another server and records it (method, path, JSON body):
what a client really sent, whatever the server on the other side does with it. It can also delay every request (a
model of a far-away API's round trip) and answer or amend chosen requests (a model of what the real service answers
where the emulator answers differently: a refusal, an estimate)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

# request -> None (forward it) or (status, JSON body) to answer it without forwarding
Intercept = Callable[[dict[str, Any]], tuple[int, Any] | None]
# (request, upstream's JSON reply) -> the reply to send instead
Amend = Callable[[dict[str, Any], Any], Any]


class RecordingProxy:
    """Forwards http://127.0.0.1:<port>/... to `upstream` (an http:// base URL); `requests` lists what came in."""

    def __init__(
        self, upstream: str, delay: float = 0.0, intercept: Intercept | None = None, amend: Amend | None = None
    ) -> None:
        target = urlsplit(upstream)
        self.requests: list[dict[str, Any]] = []
        self.delay, self.intercept, self.amend = delay, intercept, amend
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the real API: a delay models a round trip, not a connect

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    parsed = json.loads(body) if body else None
                except ValueError:
                    parsed = None
                request = {"method": self.command, "path": self.path, "json": parsed}
                recorder.requests.append(request)
                if recorder.delay:
                    time.sleep(recorder.delay)
                canned = recorder.intercept(request) if recorder.intercept else None
                if canned is not None:
                    status, reply = canned
                    self._reply(status, [("Content-Type", "application/json")], json.dumps(reply).encode())
                    return
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream_conn.request(self.command, self.path, body=body or None, headers=headers)
                reply = upstream_conn.getresponse()
                data = reply.read()
                upstream_conn.close()
                if recorder.amend and data and "json" in (reply.getheader("Content-Type") or ""):
                    data = json.dumps(recorder.amend(request, json.loads(data))).encode()
                self._reply(reply.status, reply.getheaders(), data)

            def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def jobs(self) -> list[dict[str, Any]]:
        """The BigQuery jobs.insert bodies sent, in order."""
        return [
            r["json"]
            for r in self.requests
            if r["method"] == "POST" and r["path"].split("?")[0].endswith("/jobs") and r["json"]
        ]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def bigquery_error(status: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    """An error reply in BigQuery's REST form (https://cloud.google.com/bigquery/docs/error-messages)."""
    grpc_status = {403: "PERMISSION_DENIED", 400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED"}.get(status, "UNKNOWN")
    return status, {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            "status": grpc_status,
        }
    }
