"""``python -m worker.ops``: the ops service on ``RELIABLE_OPS__HOST``:``__PORT``."""

from __future__ import annotations

import structlog
import uvicorn

from reliability.logs import configure_logging
from worker import app as service
from worker.celeryconfig import embedded_data_dir
from worker.embedded import own_for_process
from worker.ops import create_app


def main() -> None:
    settings = service.settings
    configure_logging(settings.log.level, settings.log.json_output, service.runtime.masker)
    # With no Redis URL: the embedded server, started for this process if none runs and
    # stopped when it exits. uvicorn re-raises the SIGTERM/SIGINT it caught once it has
    # shut down, so the stop hangs on process exit (own_for_process), not on a `with`.
    data_dir = embedded_data_dir(settings)
    if data_dir is not None:
        own_for_process(data_dir)
    structlog.get_logger("worker.ops").info(
        "ops_service_starting", host=settings.ops.host, port=settings.ops.port
    )
    uvicorn.run(
        create_app(service),
        host=settings.ops.host,
        port=settings.ops.port,
        log_config=None,  # the service's structured logging stays in charge
        access_log=False,
    )


if __name__ == "__main__":
    main()
