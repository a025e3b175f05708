"""The Celery app: ``celery -A worker.app worker`` and ``celery -A worker.app beat``.

Settings are read here, at the edge, and turned into the Celery configuration
(:mod:`worker.celeryconfig`) and the reliability :class:`~reliability.runtime.Runtime`
every process shares. With no Redis URL configured (development, tests) the embedded
Redis's socket is used as broker, result backend and state store; importing starts
nothing — the process that runs the service starts the server (``reliable run``, or a
standalone worker or beat at init: :mod:`worker.signals`).
"""

from __future__ import annotations

import warnings

from celery import Celery
from celery.exceptions import CPendingDeprecationWarning

from config import Settings, load_settings
from reliability.cardinality import GUARD
from reliability.runtime import Runtime, set_runtime
from reliability.security import Masker
from reliability.store import Store
from worker.celeryconfig import (
    breaker_configs,
    celery_config,
    rate_limits,
    runtime_config,
    state_url,
)
from worker.liveness import LivenessFile
from worker.metrics_endpoint import MetricsEndpoint
from worker.shutdown import ShutdownDeadline


def build(settings: Settings) -> tuple[Celery, Runtime]:
    url = state_url(settings)
    # Messages this app publishes (parked copies, redrives, child tasks) carry masked
    # argument reprs in their headers and task-sent events.
    app = Celery("reliable", amqp="reliability.reprs:ReliableAMQP")
    app.conf.update(celery_config(settings, url))
    app.steps["worker"].add(ShutdownDeadline)  # warm and cold shutdowns always end
    app.steps["worker"].add(LivenessFile)  # the exec liveness probe's file
    app.steps["worker"].add(MetricsEndpoint)  # /metrics of the main process (port 0: off)
    GUARD.configure(settings.metrics.cardinality, settings.metrics.max_label_sets)
    store = Store(
        url, settings.redis.key_prefix, socket_timeout=settings.redis.socket_timeout_seconds
    )
    runtime = Runtime(
        store,
        runtime_config(settings),
        Masker(settings.secret_values()),
        breakers=breaker_configs(settings),
        rate_limits=rate_limits(settings),
    )
    set_runtime(runtime)
    app.reliability = runtime  # type: ignore[attr-defined]
    app.settings = settings  # type: ignore[attr-defined]
    return app, runtime


# We keep running tasks alive on a broker blip on purpose (see celeryconfig): Celery's
# nudge towards killing them is noise here.
warnings.filterwarnings(
    "ignore", category=CPendingDeprecationWarning, message=r"\s*In Celery 5.1 we introduced"
)
settings = load_settings()
app, runtime = build(settings)

from worker import signals  # noqa: E402  (wires logging, context propagation, maintenance)

signals.connect(app, settings, runtime)
