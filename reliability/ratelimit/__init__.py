"""Rate limits the whole fleet obeys as one client, on Redis time.

Celery's ``rate_limit`` is per worker and holds prefetch slots while it waits. Here a
limit lives in Redis (``lua/ratelimit.lua``) and is checked inside the admission script:

* ``gcra``: a token bucket (``rate`` per second, ``burst``) as GCRA;
* ``sliding``: at most ``max_requests`` in any ``window_seconds`` (a log of admissions);
* ``fixed``: at most ``max_requests`` per aligned window;
* ``concurrency``: at most ``limit`` calls in flight; a holder that dies frees its slot
  after ``lease_seconds``.

Limits are keyed per task, tenant, user, IP or any argument, and a task may declare
several (global -> tenant -> task): all must admit, atomically. Inside a task, no token
means the admission *reserves* the task's future slot and the message is parked until
then — it runs at that time without re-admission and never holds a worker slot while it
waits, and an over-limit tenant's tasks wait outside the broker queue. Outside tasks,
:class:`RateLimiter` offers ``acquire``/``try_acquire``/``set_rate``/``reset``.
"""

from reliability.ratelimit.guard import RateLimits, admission_args, fragment
from reliability.ratelimit.limit import DEFAULT_LIMITS, SCOPE_ARGS, RateLimit, limit_keys
from reliability.ratelimit.limiter import RateLimiter

__all__ = [
    "DEFAULT_LIMITS",
    "SCOPE_ARGS",
    "RateLimit",
    "RateLimiter",
    "RateLimits",
    "admission_args",
    "fragment",
    "limit_keys",
]
