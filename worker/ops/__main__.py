"""``python -m worker.ops``: the ops service on ``RELIABLE_OPS__HOST``:``__PORT``."""

from __future__ import annotations

import structlog
import uvicorn

from reliability.logs import configure_logging
from worker import app as service
from worker.celeryconfig import embedded_data_dir
from worker.embedded import serving
from worker.ops import create_app


def main() -> None:
    settings = service.settings
    configure_logging(settings.log.level, settings.log.json_output, service.runtime.masker)
    # With no Redis URL: the embedded server (started for this process if none runs).
    with serving(embedded_data_dir(settings)):
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
