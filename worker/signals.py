"""Signal wiring: logging, start-up checks, context propagation, fleet maintenance.

Signal handlers only observe and prepare; they never gate a task (Celery swallows their
errors) — gating is the task class's job. Closures are connected with ``weak=False``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import structlog
from celery import Celery, signals

from config import Settings
from reliability import delivery
from reliability.breaker.alerts import BreakerEvents
from reliability.deadline import format_deadline
from reliability.deferral import Mover
from reliability.endings import running_deliveries
from reliability.heartbeat import Heartbeat
from reliability.lease import LeaseKeeper
from reliability.logs import clear_task_context, configure_logging
from reliability.maintenance import Maintenance
from reliability.periodic import Periodic
from reliability.reaper import Reaper, kombu_restorer
from reliability.runtime import Runtime
from reliability.sensitive import clear_delivery_values
from reliability.transport import TRANSPORT_PATH, restore_owned, sweep_orphans
from worker import embedded, preflight
from worker.alerting import alert_hooks
from worker.celeryconfig import embedded_data_dir

log = structlog.get_logger("worker")


# How often each worker looks for breaker transitions to alert on.
ALERT_INTERVAL_SECONDS = 0.5


def propagate_context(headers: dict[str, Any] | None) -> None:
    """Child tasks inherit the correlation id and what is left of the deadline."""
    parent = delivery.current()
    if parent is None or headers is None:
        return
    headers.setdefault(delivery.CORRELATION_ID, parent.correlation_id)
    if parent.deadline is not None and not headers.get(delivery.DEADLINE):
        headers[delivery.DEADLINE] = format_deadline(parent.deadline)
    if parent.tenant_id and not headers.get(delivery.TENANT_ID):
        headers[delivery.TENANT_ID] = parent.tenant_id


def connect(app: Celery, settings: Settings, runtime: Runtime) -> None:
    state: dict[str, Any] = {}

    def setup_logging(**_: Any) -> None:
        configure_logging(settings.log.level, settings.log.json_output, runtime.masker)

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        # Main process, before consuming: refuse names the settings do not define, then
        # start the embedded Redis if none is configured (stopped at exit if started here).
        preflight.refuse_broken_configuration(app.tasks, runtime)
        own_embedded_redis()
        preflight.run_security_checks(settings)
        log.info(
            "worker_configured",
            environment=str(settings.environment),
            queue=settings.broker.queue,
            key_prefix=settings.redis.key_prefix,
            broker=runtime.masker.text(str(app.conf.broker_url)),
        )
        # The pulse of this worker's main process, started before it consumes: beats
        # (so the fleet revives its work within seconds if it dies) and renews the
        # leases of the bodies its pool children run (which they cannot starve).
        heartbeat = Heartbeat(
            runtime.store,
            LeaseKeeper(runtime.store, running_deliveries),
            name=str(getattr(sender, "hostname", "") or ""),  # the Celery node name
            interval=settings.worker.heartbeat_interval_seconds,
            ttl=settings.worker.heartbeat_ttl_seconds,
        )
        heartbeat.start()
        state["heartbeat"] = heartbeat

    def own_embedded_redis(**_: Any) -> None:
        data_dir = embedded_data_dir(settings)
        if data_dir is not None:
            embedded.own_for_process(data_dir)

    def on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
        propagate_context(headers)

    def on_worker_ready(sender: Any = None, **_: Any) -> None:
        reaper = Reaper(
            runtime.store,
            kombu_restorer(app),
            restore_owned=lambda worker: restore_owned(app, worker),
            heartbeat_ttl=settings.worker.heartbeat_ttl_seconds,
            heartbeat_interval=settings.worker.heartbeat_interval_seconds,
        )
        mover = Mover(
            runtime.store,
            app,
            claim_seconds=settings.deferral.claim_timeout_seconds,
            batch_size=settings.deferral.batch_size,
        )
        # Breaker transitions reach the alert hooks on their own thread (a webhook may
        # take seconds); the consumer group gives each transition to one worker.
        events = BreakerEvents(
            runtime.store,
            alert_hooks(settings, runtime),
            consumer=f"{socket.gethostname()}:{os.getpid()}",
        )
        alerts = Periodic("reliable-breaker-alerts", events.deliver, ALERT_INTERVAL_SECONDS)
        alerts.start()
        state["alerts"] = alerts
        sweepers: list[Callable[[], int]] = []
        if app.conf.broker_transport == TRANSPORT_PATH:
            sweepers.append(lambda: sweep_orphans(app))
        maintenance = Maintenance(
            runtime.store,
            mover,
            reaper,
            interval=settings.deferral.mover_interval_seconds,
            sweepers=sweepers,
        )
        maintenance.start()
        state["maintenance"] = maintenance

    def on_worker_shutdown(**_: Any) -> None:
        alerts = state.pop("alerts", None)
        if alerts is not None:
            alerts.stop()
        maintenance = state.pop("maintenance", None)
        if maintenance is not None:
            maintenance.stop()
            maintenance.join(timeout=5)
        heartbeat = state.pop("heartbeat", None)
        if heartbeat is not None:
            heartbeat.stop(deregister=True)

    def check_task_modules(**_: Any) -> None:
        # Fires just before Celery imports the task modules (worker and beat): a missing
        # one is one line and exit 78, not a traceback. SystemExit passes Celery's
        # signal dispatch, which would swallow an Exception.
        preflight.refuse_missing_task_modules(settings.worker.task_modules)

    signals.import_modules.connect(check_task_modules, weak=False)
    signals.setup_logging.connect(setup_logging, weak=False)
    signals.worker_init.connect(on_worker_init, weak=False)
    signals.beat_init.connect(own_embedded_redis, weak=False)
    signals.before_task_publish.connect(on_publish, weak=False)
    signals.task_postrun.connect(lambda **_: clear_task_context(), weak=False)
    signals.task_postrun.connect(lambda **_: clear_delivery_values(), weak=False)
    signals.worker_ready.connect(on_worker_ready, weak=False)
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
