"""The Celery app, its entry points and the ops service (see ``worker.app``)."""

from worker import multiproc

# First, before anything imports prometheus-client: this process's metrics directory.
multiproc.prepare()
