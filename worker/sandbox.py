"""Local HTTP sandbox provider: a stand-in for payment, notification, webhook and export APIs.

Why: "never twice" is only checkable against something that counts raw calls. This server
records every call it receives -- duplicates included, never de-duplicated -- with its
idempotency key, fencing token and timing, so tests and demos can assert exactly how many side
effects happened, whether two calls for one key overlapped in time, and whether a stale lease
holder got through. Fault knobs (error rate, latency, outage, scripted statuses, Retry-After)
make the failure paths reproducible. Stdlib only, so it runs wherever the tests run.

In-process: ``with SandboxProvider() as sb: ...; sb.effects()``. Standalone: ``reliable-sandbox
--port 8099``, driven over HTTP with ``GET /effects[?endpoint=charges]``, ``GET|POST /faults``,
``POST /reset`` and ``GET /health``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

EFFECT_ENDPOINTS = ("charges", "notifications", "webhooks", "exports")
CHARGE_FIELDS = ("payment_id", "amount", "currency")
DEFAULT_FAULTS: dict[str, Any] = {
    "error_rate": 0.0,
    "error_status": 503,
    "latency_seconds": 0.0,
    "latency_by_endpoint": {},
    "outage": False,
    "script": [],
    "retry_after_seconds": None,
    "seed": 0,
}
Reply = tuple[int, Any, dict[str, str]]  # (HTTP status, JSON payload, extra headers)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v >= 0


def _status(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 200 <= v <= 599


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "error_rate": lambda v: _num(v) and v <= 1,
    "error_status": lambda v: _status(v) and v >= 400,
    "latency_seconds": _num,
    "latency_by_endpoint": lambda v: isinstance(v, dict) and all(map(_num, v.values())),
    "outage": lambda v: isinstance(v, bool),
    "script": lambda v: isinstance(v, list) and all(map(_status, v)),
    "retry_after_seconds": lambda v: v is None or _num(v),
    "seed": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
}


def _valid_charge(body: Any) -> bool:
    ok = isinstance(body, dict) and all(body.get(f) is not None for f in CHARGE_FIELDS)
    return ok and _num(body["amount"]) and body["amount"] > 0


class SandboxProvider:
    """Fake third-party API that records every raw call; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._lock = threading.Lock()  # guards records, counters, fences, knobs and the rng
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0
        self._clear()

    def _clear(self) -> None:  # caller holds the lock (or is __init__)
        self._records: list[dict[str, Any]] = []
        self._seq = 0
        self._counters: dict[str, int] = {}
        self._fences: dict[str, int] = {}
        self._faults: dict[str, Any] = copy.deepcopy(DEFAULT_FAULTS)
        self._rng = random.Random(self._faults["seed"])
        self._generation += 1

    def start(self) -> SandboxProvider:
        if self._server is None:
            self._server = _Server((self.host, self.port), self)
            self.port = self._server.server_address[1]
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"sandbox-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_connections()  # idle keep-alive connections must not outlive stop()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("SandboxProvider is not started")
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> SandboxProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def effects(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Every recorded call (not only effects), in arrival (``seq``) order."""
        with self._lock:
            recs = [dict(r) for r in self._records if endpoint in (None, r["endpoint"])]
        return sorted(recs, key=lambda r: r["seq"])

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._faults)

    def set_faults(self, **knobs: Any) -> dict[str, Any]:
        """Partially update the fault knobs; raises ValueError on unknown or bad values."""
        for name, value in knobs.items():
            if name not in _CHECKS or not _CHECKS[name](value):
                raise ValueError(f"invalid fault knob {name}={value!r}")
        with self._lock:
            self._faults.update(copy.deepcopy(knobs))
            if "seed" in knobs:
                self._rng = random.Random(knobs["seed"])
            return copy.deepcopy(self._faults)

    def handle(self, method: str, target: str, headers: Message, raw: bytes) -> Reply:
        url = urlsplit(target)
        parts = [p for p in url.path.split("/") if p]
        if (
            method == "POST"
            and parts
            and parts[0] in EFFECT_ENDPOINTS
            and (len(parts) == 1 or parts[0] == "webhooks")
        ):
            return self._call(parts[0], url.path, headers, raw)
        route = (method, url.path.rstrip("/") or "/")
        if route == ("GET", "/health"):  # the provider's probe endpoint: down in an outage
            if self.faults()["outage"]:
                return 503, {"status": "outage"}, {}
            return 200, {"status": "ok"}, {}
        if route == ("GET", "/effects"):
            endpoint = parse_qs(url.query).get("endpoint", [None])[0]
            return 200, {"effects": self.effects(endpoint)}, {}
        if route == ("POST", "/reset"):
            self.reset()
            return 200, {"status": "reset"}, {}
        if route == ("GET", "/faults"):
            return 200, self.faults(), {}
        if route == ("POST", "/faults"):
            try:
                knobs = json.loads(raw or b"{}")
                if not isinstance(knobs, dict):
                    raise ValueError("fault knobs must be a JSON object")
                return 200, self.set_faults(**knobs), {}
            except ValueError as exc:
                return 400, {"error": str(exc)}, {}
        return 404, {"error": f"no route for {method} {url.path}"}, {}

    def _call(self, endpoint: str, path: str, headers: Message, raw: bytes) -> Reply:
        rec: dict[str, Any] = {
            "seq": 0,
            "endpoint": endpoint,
            "path": path,
            "idempotency_key": headers.get("Idempotency-Key"),
            "fencing_token": None,
            "correlation_id": headers.get("X-Correlation-ID"),
            "body": None,
            "status": 0,
            "arrived_at": time.time(),
            "finished_at": 0.0,
            "outcome": "rejected",
        }
        problem: str | None = None
        try:
            rec["body"] = json.loads(raw) if raw.strip() else None
        except ValueError:
            problem = "invalid JSON body"
        token = headers.get("X-Fencing-Token")
        try:
            rec["fencing_token"] = None if token is None else int(token)
        except ValueError:
            problem = problem or "X-Fencing-Token must be an integer"
        with self._lock:
            self._seq += 1
            rec["seq"], generation = self._seq, self._generation
            knobs = self._faults
            latency = knobs["latency_by_endpoint"].get(endpoint, knobs["latency_seconds"])
            reply = self._fail(rec, 400, problem) if problem else self._decide(endpoint, rec)
        if latency > 0:
            time.sleep(latency)  # outside the lock: concurrent calls overlap in time
        rec["finished_at"] = time.time()
        with self._lock:
            if generation == self._generation:  # a reset() meanwhile discards this record
                self._records.append(rec)
        return reply

    def _decide(self, endpoint: str, rec: dict[str, Any]) -> Reply:  # caller holds the lock
        knobs, forced = self._faults, None
        if knobs["outage"]:
            return self._fail(rec, 503, "provider outage", outcome="outage", injected=True)
        if knobs["script"]:
            forced = knobs["script"].pop(0)
            if forced >= 300:
                return self._fail(rec, forced, "scripted failure", injected=True)
        elif knobs["error_rate"] and self._rng.random() < knobs["error_rate"]:
            return self._fail(rec, knobs["error_status"], "injected error", injected=True)
        if endpoint == "charges" and not _valid_charge(rec["body"]):
            return self._fail(rec, 422, "charges need payment_id, currency and amount > 0")
        key, token = rec["idempotency_key"], rec["fencing_token"]
        if key is not None and token is not None:
            highest = self._fences.get(key)
            if highest is not None and token < highest:
                rec["status"], rec["outcome"] = 409, "stale_fence"
                return 409, {"error": "stale fencing token", "highest": highest}, {}
            self._fences[key] = token
        n = self._counters[endpoint] = self._counters.get(endpoint, 0) + 1
        rec["status"], rec["outcome"] = forced or 200, "effect"
        payload = {
            "id": f"{endpoint}_{n}",
            "status": "ok",
            "idempotency_key": key,
            "seq": rec["seq"],
        }
        return rec["status"], payload, {}

    def _fail(
        self,
        rec: dict[str, Any],
        status: int,
        message: str,
        *,
        outcome: str | None = None,
        injected: bool = False,
    ) -> Reply:
        rec["status"] = status
        rec["outcome"] = outcome or ("error" if status >= 500 else "rejected")
        headers: dict[str, str] = {}
        retry_after = self._faults["retry_after_seconds"]
        if injected and retry_after is not None:
            headers["Retry-After"] = f"{retry_after:g}"
        elif injected and status == 429:
            headers["Retry-After"] = "1"
        return status, {"error": message, "status": status}, headers


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], provider: SandboxProvider) -> None:
        self.provider = provider
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Client disconnects are routine; handler bugs are already answered with a 500."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    disable_nagle_algorithm = True  # headers and body go out as separate small writes
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: thousands of requests per test run."""

    def _dispatch(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0 or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                raise ValueError
        except ValueError:
            self.close_connection = True  # cannot find the end of the body: drop the stream
            return self._send((400, {"error": "a valid Content-Length is required"}, {}))
        raw = self.rfile.read(length) if length else b""
        try:
            reply = self.server.provider.handle(self.command, self.path, self.headers, raw)
        except Exception as exc:  # never let a bug kill the connection thread silently
            reply = 500, {"error": f"sandbox bug: {exc!r}"}, {}
        self._send(reply)

    do_GET = do_POST = _dispatch

    def _send(self, reply: Reply) -> None:
        status, payload, headers = reply
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reliable-sandbox", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099, help="0 picks a free port")
    args = parser.parse_args(argv)
    provider = SandboxProvider(args.host, args.port).start()
    print(f"reliable-sandbox listening on {provider.url}", flush=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: clean stop too
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        provider.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
