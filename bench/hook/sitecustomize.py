"""Loaded at start-up by every Python process of a benchmarked worker (via PYTHONPATH).

Installs the Redis round-trip counter when ``BENCH_ROUNDTRIP_DIR`` is set and the
pool-child-loss recorder when ``BENCH_CHILD_LOSS_FILE`` is set; otherwise it does
nothing, so the directory is harmless on any other process's path.
"""

import os

if os.environ.get("BENCH_ROUNDTRIP_DIR"):
    from bench import roundtrips

    roundtrips.install(os.environ["BENCH_ROUNDTRIP_DIR"])

if os.environ.get("BENCH_CHILD_LOSS_FILE"):
    from bench import childloss

    childloss.install(os.environ["BENCH_CHILD_LOSS_FILE"])
