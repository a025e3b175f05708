"""The ops HTTP service: health, metrics, the admin API and the dashboard.

Its own process (``reliable ops``, uvicorn): on-call engineers see and steer reliability
without opening Redis — which breakers are open, which limits throttle, what sits in the
DLQ, what the last report says — and act behind a bearer token (:mod:`worker.ops.auth`).
Every admin action is logged and recorded with who did what (:mod:`worker.ops.audit`).
"""

from worker.ops.app import create_app

__all__ = ["create_app"]
