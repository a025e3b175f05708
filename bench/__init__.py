"""Benchmarks, run on demand and never part of the test run: ``python -m bench.throughput``.

Bare Celery (``bench.bare_app``) and the reliable stack (``worker.app`` with
``bench.reliable_tasks``) are measured in the same run, interleaved, and reported as
ratios; see ``bench/README.md`` for how to read the numbers.
"""
