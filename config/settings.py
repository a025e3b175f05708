"""One settings tree for the whole service, read from the environment and `.env`.

Every variable starts with ``RELIABLE_``; nested groups use ``__``
(``RELIABLE_IDEMPOTENCY__LEASE_TTL_SECONDS=60``). ``environment`` picks safe defaults
for the values a deployment does not set. Secrets are ``SecretStr`` so they never
print; :func:`load_settings` turns a bad value into a message naming the variable.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

ENV_PREFIX = "RELIABLE_"
NESTED_DELIMITER = "__"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TESTING = "testing"
    PRODUCTION = "production"


class RedisSettings(BaseModel):
    """The state store. No URL means: start an embedded Redis (development and testing)."""

    url: SecretStr | None = None
    key_prefix: str = Field("rel", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    data_dir: str = ".data"
    socket_timeout_seconds: float = Field(5.0, gt=0)
    # While the store is unreachable a task waits this long, then hands its message back.
    unavailable_wait_seconds: float = Field(30.0, ge=0)


class BrokerSettings(BaseModel):
    """The Celery broker. No URL means: the same Redis as the state store."""

    url: SecretStr | None = None
    # Celery result backend; default: the state store's Redis.
    result_backend_url: SecretStr | None = None
    queue: str = "reliable"
    # Must exceed the longest task plus the longest in-worker countdown; long waits are
    # parked in Redis instead, so one hour is plenty.
    visibility_timeout_seconds: int = Field(3600, ge=1)
    # How often kombu sweeps for messages whose visibility timeout passed (kombu 5.7).
    unacked_restore_interval_seconds: int = Field(10, ge=1)
    global_keyprefix: str = ""
    # Larger messages (the item on the Redis list, or the AMQP body) are dead-lettered as
    # poison (too_large) without being decoded. 0 = no limit.
    max_message_bytes: int = Field(1024 * 1024, ge=0)


# A dotted Python module name ("tasks.payments").
ModuleName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")]
# The business tasks a worker loads unless told otherwise (RELIABLE_WORKER__TASK_MODULES).
BUSINESS_TASK_MODULES = ("tasks.payments", "tasks.notifications", "tasks.webhooks", "tasks.exports")


class WorkerSettings(BaseModel):
    concurrency: int = Field(2, ge=1)
    # The modules of tasks the worker imports (a JSON list in env); a module not listed is
    # never imported. The service's own maintenance jobs are always loaded.
    task_modules: list[ModuleName] = Field(default_factory=lambda: list(BUSINESS_TASK_MODULES))
    prefetch_multiplier: int = Field(1, ge=1)
    soft_shutdown_timeout_seconds: float = Field(30.0, ge=0)
    default_soft_time_limit_seconds: float | None = Field(300.0, gt=0)
    default_time_limit_seconds: float | None = Field(330.0, gt=0)
    # The main process beats this often; silent for heartbeat_ttl_seconds = dead, and the
    # fleet restores its unacked messages and frees its leases (see README, revival).
    heartbeat_interval_seconds: float = Field(1.0, gt=0)
    heartbeat_ttl_seconds: float = Field(4.0, gt=0)


class IdempotencySettings(BaseModel):
    lease_ttl_seconds: float = Field(60.0, gt=0)
    # Completed keys are remembered this long by default (tasks override per task).
    # Must exceed the broker visibility timeout plus the longest deferral.
    result_ttl_seconds: int = Field(86_400, ge=60)


class RetrySettings(BaseModel):
    strategy: Literal["exponential", "linear", "fixed", "fibonacci", "decorrelated"] = "exponential"
    base_delay_seconds: float = Field(1.0, ge=0)
    max_delay_seconds: float = Field(300.0, ge=0)
    max_attempts: int = Field(5, ge=1)
    max_elapsed_seconds: float | None = Field(None, gt=0)
    jitter: Literal["none", "full", "equal"] = "full"
    # Fleet-wide retry budget per dependency (Finagle's RetryBudget): in any window of
    # budget_window_seconds, retries <= budget_min_retries_per_second * window
    # + budget_ratio * calls (every attempt that ended, retries included).
    budget_ratio: float = Field(0.2, ge=0)
    budget_min_retries_per_second: float = Field(10.0, ge=0)
    budget_window_seconds: int = Field(10, ge=1)
    # Renamed (a count per window became a rate): refused, naming its successor.
    budget_min_retries: Any = Field(None, exclude=True, repr=False)

    @field_validator("budget_min_retries")
    @classmethod
    def _renamed_min_retries(cls, value: Any) -> Any:
        if value is not None:
            raise PydanticCustomError(
                "renamed",
                "renamed RELIABLE_RETRY__BUDGET_MIN_RETRIES_PER_SECOND, now a rate (retries"
                " per second, default 10) instead of a count per window: set that instead",
            )
        return value


class DeferralSettings(BaseModel):
    mover_interval_seconds: float = Field(0.2, gt=0)
    # A mover that published but died before confirming is taken over after this.
    claim_timeout_seconds: float = Field(30.0, gt=0)
    # Re-check a key held by another delivery after this many seconds.
    in_progress_recheck_seconds: float = Field(1.0, gt=0)
    batch_size: int = Field(100, ge=1)


class DeliverySettings(BaseModel):
    # A message redelivered more than this many times goes to the DLQ as poison.
    max_redeliveries: int = Field(5, ge=0)


class DlqSettings(BaseModel):
    max_entries: int = Field(100_000, ge=1)
    max_redrives: int = Field(3, ge=0)
    max_age_days: int = Field(14, ge=1)


class LedgerSettings(BaseModel):
    max_len: int = Field(1_000_000, ge=100)


class ProviderSettings(BaseModel):
    payment_base_url: str = "http://127.0.0.1:8099"
    notification_base_url: str = "http://127.0.0.1:8099"
    export_base_url: str = "http://127.0.0.1:8099"
    payment_api_key: SecretStr | None = None
    notification_api_key: SecretStr | None = None
    timeout_seconds: float = Field(10.0, gt=0)


class BreakerSettings(BaseModel):
    """One circuit breaker (see reliability.breaker.BreakerConfig for the semantics)."""

    failure_threshold: int = Field(5, ge=0)
    failure_rate_threshold: float = Field(0.0, ge=0, le=1)
    window_type: Literal["count", "time"] = "count"
    window_size: float = Field(100, gt=0)
    minimum_requests: int = Field(10, ge=1)
    slow_call_seconds: float = Field(0.0, ge=0)
    slow_call_rate_threshold: float = Field(1.0, gt=0, le=1)
    recovery_timeout_seconds: float = Field(60.0, gt=0)
    half_open_max_calls: int = Field(2, ge=1)
    success_threshold: int = Field(2, ge=1)
    trial_lease_seconds: float = Field(60.0, gt=0)


class RateLimitSettings(BaseModel):
    """One fleet-wide rate limit (see reliability.ratelimit.RateLimit)."""

    kind: Literal["gcra", "sliding", "fixed", "concurrency"] = "gcra"
    rate: float = Field(10.0, gt=0)
    burst: int = Field(1, ge=1)
    max_requests: int = Field(100, ge=1)
    window_seconds: float = Field(60.0, gt=0)
    limit: int = Field(10, ge=1)
    lease_seconds: float = Field(300.0, gt=0)
    per: str = Field("global", pattern=r"^(global|task|tenant|user|ip|arg:\w+)$")
    cost: int = Field(1, ge=1)


class AlertSettings(BaseModel):
    """Alert hooks (worker/alerting.py): every alert is logged, counted, appended to the
    stream ``P:alerts`` and, with a URL, POSTed as JSON."""

    # A secret: it may carry a token. Each alert is retried on a transport error or a
    # 408/425/429/5xx answer, at most webhook_attempts times and webhook_max_seconds in all.
    webhook_url: SecretStr | None = None
    webhook_timeout_seconds: float = Field(5.0, gt=0)
    webhook_attempts: int = Field(3, ge=1)
    webhook_max_seconds: float = Field(10.0, gt=0)
    webhook_backoff_seconds: float = Field(0.5, ge=0)
    # Alerts kept in the stream P:alerts (the newest).
    stream_max_len: int = Field(10_000, ge=100)


class MonitorSettings(BaseModel):
    """The breaker monitor (beat job ``breaker-monitor``): alert thresholds and history."""

    # A breaker that has not closed for this long (open, or half-open failing its
    # trials) raises one alert per episode.
    open_alert_seconds: float = Field(600.0, gt=0)
    # More trips (closed -> open) than this in the last hour is flapping: one alert,
    # then none until the count has fallen below it.
    flaps_per_hour: int = Field(3, ge=1)
    # Snapshot history: older entries are trimmed, and never more than the cap.
    history_seconds: float = Field(7 * 86400.0, gt=0)
    history_max_entries: int = Field(100_000, ge=100)


class MaintenanceSettings(BaseModel):
    """Beat's schedule: seconds between runs of each job (seed 003's defaults).

    Each job runs at most once per slot (``floor(now / interval)``) however many beat
    processes send it: ``RELIABLE_MAINTENANCE__HEALTH_POLL_SECONDS=30``.
    """

    dlq_reprocess_seconds: float = Field(300.0, gt=0)
    breaker_monitor_seconds: float = Field(120.0, gt=0)
    health_poll_seconds: float = Field(60.0, gt=0)
    report_hourly_seconds: float = Field(3600.0, gt=0)
    report_daily_seconds: float = Field(86400.0, gt=0)
    dlq_cleanup_seconds: float = Field(86400.0, gt=0)
    # Job runs kept in the job ledger (reliable jobs).
    job_history: int = Field(10_000, ge=100)
    # A second beat process waits on this lock and takes over when its holder stops
    # renewing it (celery-redbeat).
    beat_lock_timeout_seconds: float = Field(30.0, ge=5)


class MetricsSettings(BaseModel):
    """Prometheus metrics (README, Metrics): the worker's own endpoint, multiprocess files,
    the cardinality guard, and Flower beside ``reliable run --flower``."""

    # The worker's main process serves /metrics here (0 = off; the ops service always
    # serves /metrics on its own port). Several workers on one host need one port each.
    port: int = Field(0, ge=0, le=65535)
    host: str = "127.0.0.1"
    # Base of the per-process multiprocess directories (<base>/<main pid>). Read from the
    # environment by the entry point before settings load (worker/multiproc.py);
    # default <tmp>/reliable-metrics-<uid>.
    multiproc_dir: str | None = None
    # Label names and values that look unbounded (ids, uuids, timestamps) or more than
    # max_label_sets label sets in one family: strict raises, warning logs once and
    # records the sample under "other".
    cardinality: Literal["strict", "warning"] = "warning"
    max_label_sets: int = Field(1000, ge=1)
    # Seconds the ops service caches the DLQ's size by failure class between scrapes.
    dlq_cache_seconds: float = Field(10.0, ge=0)
    # Where `reliable run --flower` starts Flower.
    flower_host: str = "127.0.0.1"
    flower_port: int = Field(5555, ge=1, le=65535)


class OpsSettings(BaseModel):
    """The ops HTTP service (``reliable ops``): health, metrics, admin API, dashboard."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    # Bearer tokens for /admin, by the name recorded with every action:
    # RELIABLE_OPS__ADMIN_TOKENS='{"alice": "<token>"}'. None configured: /admin is closed.
    admin_tokens: dict[str, SecretStr] = Field(default_factory=dict)
    # Failed admin authentications one client may make per window before it gets 429.
    auth_failures: int = Field(10, ge=1)
    auth_failure_window_seconds: float = Field(60.0, gt=0)
    # Admin actions kept in the audit stream.
    audit_max_len: int = Field(10_000, ge=100)

    @field_validator("admin_tokens", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        # An unset compose variable arrives as "": no token, the admin API closed.
        return {} if value == "" else value

    @field_validator("admin_tokens")
    @classmethod
    def _strong_tokens(cls, tokens: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, token in tokens.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(f"admin token name {name[:64]!r}: use 1-64 of [A-Za-z0-9_.-]")
            if len(token.get_secret_value()) < 16:
                raise ValueError(f"admin token {name!r} is shorter than 16 characters")
        return tokens


class ReprocessSettings(BaseModel):
    """DLQ reprocessing by policy (beat job ``dlq-reprocess``, ``reliable dlq reprocess``).

    A ``transient`` or ``retry_budget_exhausted`` entry is redriven no earlier than
    ``backoff_base_seconds * 2**redrives`` (at most ``backoff_max_seconds``) after its
    last failure; a run redrives at most ``max_per_run`` entries; a claim on an entry
    being redriven lapses after ``claim_seconds`` (its redriver died mid-way).
    """

    backoff_base_seconds: float = Field(60.0, ge=0)
    backoff_max_seconds: float = Field(3600.0, ge=0)
    max_per_run: int = Field(100, ge=1)
    claim_seconds: float = Field(60.0, gt=0)


class ReportSettings(BaseModel):
    """The reliability report (hourly and daily) and its retry analytics (seed 004).

    ``RELIABLE_REPORTS__OBJECTIVES='{"payments.charge": 0.99}'``: a task's success-rate
    objective; the report shows how fast each period burns its error budget.
    """

    # Reports kept per period (7 days of hourly ones, 90 daily ones).
    hourly_retention: int = Field(168, ge=1)
    daily_retention: int = Field(90, ge=1)
    # Ledger read before the period: retry windows that close in it started there, and
    # the spike detector's baseline.
    lookback_seconds: float = Field(3600.0, ge=0)
    top_fingerprints: int = Field(10, ge=1)
    # Anomalies: retried share of attempts (over at least min attempts), window length,
    # attempts of one logical task.
    anomaly_retry_rate: float = Field(0.2, gt=0, le=1)
    anomaly_min_attempts: int = Field(20, ge=1)
    anomaly_window_seconds: float = Field(300.0, gt=0)
    anomaly_attempts: int = Field(5, ge=1)
    # Spikes: retries in a sliding window >= max(min retries, multiplier x baseline).
    spike_window_seconds: float = Field(60.0, gt=0)
    spike_baseline_seconds: float = Field(900.0, gt=0)
    spike_multiplier: float = Field(3.0, ge=1)
    spike_min_retries: int = Field(10, ge=1)
    objectives: dict[str, float] = Field(default_factory=dict)

    @field_validator("objectives")
    @classmethod
    def _objectives_are_rates(cls, value: dict[str, float]) -> dict[str, float]:
        wrong = sorted(name for name, rate in value.items() if not 0 < rate < 1)
        if wrong:
            raise ValueError(
                f"a success-rate objective is a number between 0 and 1 (e.g. 0.99): {wrong}"
            )
        return value

    @model_validator(mode="after")
    def _baseline_longer_than_window(self) -> ReportSettings:
        if self.spike_baseline_seconds <= self.spike_window_seconds:
            raise ValueError(
                "RELIABLE_REPORTS__SPIKE_BASELINE_SECONDS must exceed"
                " RELIABLE_REPORTS__SPIKE_WINDOW_SECONDS"
            )
        return self


class DegradationRuleSettings(BaseModel):
    """One degradation rule: ``level`` when its one condition holds — ``component`` (a
    health component or a glob, ``provider:*``) at ``status`` or worse, ``breaker`` (a
    name or glob) open, or at least ``breakers_open`` breakers open."""

    level: Literal["MINOR", "MODERATE", "SEVERE", "CRITICAL"]
    component: str | None = None
    status: Literal["degraded", "unhealthy"] = "unhealthy"
    breaker: str | None = None
    breakers_open: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_condition(self) -> DegradationRuleSettings:
        if sum(x is not None for x in (self.component, self.breaker, self.breakers_open)) != 1:
            raise ValueError("a rule takes exactly one of component, breaker, breakers_open")
        return self


class DegradationSettings(BaseModel):
    """Degradation levels (README "Degradation levels"): the rules (None: the built-in
    defaults; a list replaces them, highest matching level wins), how long a task
    deferred by its plan waits before it looks again, and how old a health result may
    be before the rules ignore it. RELIABLE_DEGRADATION__RULES='[{"breaker": "payment",
    "level": "MODERATE"}]'"""

    rules: list[DegradationRuleSettings] | None = None
    recheck_seconds: float = Field(30.0, gt=0)
    health_max_age_seconds: float = Field(300.0, gt=0)


# Components a health check may name (reliability.health); providers by their settings.
HEALTH_COMPONENTS = (
    "redis",
    "broker",
    "workers",
    "beat",
    "provider:payment",
    "provider:notification",
    "provider:export",
)


class HealthSettings(BaseModel):
    """Health checks (beat's ``health-poll`` job, ``reliable health``) and the liveness
    files the Kubernetes exec probes read (README, "Health and Kubernetes probes")."""

    # Each check's own timeout: a check still running then is unhealthy ("timed out").
    redis_timeout_seconds: float = Field(2.0, gt=0)
    broker_timeout_seconds: float = Field(3.0, gt=0)
    provider_timeout_seconds: float = Field(3.0, gt=0)
    # GET <provider base URL><path> is each downstream API's probe; "" = not checked.
    payment_probe_path: str = "/health"
    notification_probe_path: str = "/health"
    export_probe_path: str = "/health"
    # A check answering slower than this is degraded.
    slow_ms: float = Field(1000.0, gt=0)
    # Fewer live workers (heartbeats) than this is degraded; none is unhealthy.
    min_workers: int = Field(1, ge=1)
    # Beat sets its pulse on every tick; no tick for this long = beat unhealthy.
    beat_stale_seconds: float = Field(30.0, gt=0)
    # Not ready (reliable health exits 1, readiness 503) when one of these is unhealthy.
    critical: list[str] = Field(default_factory=lambda: ["redis", "broker"])
    # Polls kept in the history stream (P:health:history).
    history: int = Field(10_000, ge=10)
    # Liveness files for exec probes ("" = none): the worker's, touched by its event loop
    # every worker_file_touch_seconds; beat's, touched on every scheduler tick.
    worker_file: str = "/tmp/reliable-worker-alive"
    worker_file_touch_seconds: float = Field(5.0, gt=0)
    beat_file: str = "/tmp/reliable-beat-alive"

    @field_validator("payment_probe_path", "notification_probe_path", "export_probe_path")
    @classmethod
    def _a_path(cls, value: str) -> str:
        if value and (not value.startswith("/") or any(c.isspace() for c in value)):
            raise PydanticCustomError(
                "probe_path", "a path on the provider's base URL, starting with '/' (or empty)"
            )
        return value

    @field_validator("critical")
    @classmethod
    def _known_components(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(HEALTH_COMPONENTS))
        if unknown:
            raise PydanticCustomError(
                "unknown_component",
                "unknown health component(s) {unknown}; known: {known}",
                {"unknown": ", ".join(unknown), "known": ", ".join(HEALTH_COMPONENTS)},
            )
        return value

    @model_validator(mode="after")
    def _critical_is_checked(self) -> HealthSettings:
        for name in self.critical:
            provider = name.removeprefix("provider:")
            if provider != name and not getattr(self, f"{provider}_probe_path"):
                raise ValueError(
                    f"{name} is critical but RELIABLE_HEALTH__{provider.upper()}_PROBE_PATH is"
                    " empty: it would never be checked"
                )
        return self


class LogSettings(BaseModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_output: bool = True


class Settings(BaseSettings):
    """The whole configuration. Read it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        env_file=".env",
        extra="ignore",
    )

    environment: Environment = Environment.DEVELOPMENT
    redis: RedisSettings = RedisSettings()
    broker: BrokerSettings = BrokerSettings()
    worker: WorkerSettings = WorkerSettings()
    idempotency: IdempotencySettings = IdempotencySettings()
    retry: RetrySettings = RetrySettings()
    deferral: DeferralSettings = DeferralSettings()
    delivery: DeliverySettings = DeliverySettings()
    dlq: DlqSettings = DlqSettings()
    ledger: LedgerSettings = LedgerSettings()
    providers: ProviderSettings = ProviderSettings()
    # Named breakers; payment, notification, analytics and database have built-in
    # defaults (seed 000/003) which entries here replace. JSON in the environment:
    # RELIABLE_BREAKERS='{"payment": {"failure_threshold": 3}}'
    breakers: dict[str, BreakerSettings] = Field(default_factory=dict)
    # Named rate limits tasks refer to: RELIABLE_RATE_LIMITS='{"payments-api":
    # {"kind": "gcra", "rate": 50, "burst": 10}}'
    rate_limits: dict[str, RateLimitSettings] = Field(default_factory=dict)
    alerts: AlertSettings = AlertSettings()
    monitor: MonitorSettings = MonitorSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    ops: OpsSettings = OpsSettings()
    metrics: MetricsSettings = MetricsSettings()
    health: HealthSettings = HealthSettings()
    reprocess: ReprocessSettings = ReprocessSettings()
    reports: ReportSettings = ReportSettings()
    degradation: DegradationSettings = DegradationSettings()
    log: LogSettings = LogSettings()

    @model_validator(mode="before")
    @classmethod
    def _environment_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        env = str(data.get("environment") or Environment.DEVELOPMENT.value).lower()
        defaults = ENVIRONMENT_DEFAULTS.get(env, {})
        return _deep_merge(defaults, data)

    @model_validator(mode="after")
    def _environment_rules(self) -> Settings:
        if self.environment is Environment.PRODUCTION and self.redis.url is None:
            raise ValueError(
                "production needs RELIABLE_REDIS__URL: an embedded Redis is for development"
                " and tests only"
            )
        vt = self.broker.visibility_timeout_seconds
        hard = self.worker.default_time_limit_seconds
        if hard is not None and hard >= vt:
            raise ValueError(
                f"RELIABLE_BROKER__VISIBILITY_TIMEOUT_SECONDS ({vt}) must exceed the longest"
                f" task (RELIABLE_WORKER__DEFAULT_TIME_LIMIT_SECONDS={hard})"
            )
        if self.worker.heartbeat_ttl_seconds < 2 * self.worker.heartbeat_interval_seconds:
            raise ValueError(
                "RELIABLE_WORKER__HEARTBEAT_TTL_SECONDS must be at least twice"
                " RELIABLE_WORKER__HEARTBEAT_INTERVAL_SECONDS, or a live worker could be"
                " declared dead between two beats"
            )
        if self.idempotency.result_ttl_seconds <= vt:
            raise ValueError(
                "RELIABLE_IDEMPOTENCY__RESULT_TTL_SECONDS must exceed the broker visibility"
                f" timeout ({vt} s), or a redelivered duplicate could run again"
            )
        return self

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log/DLQ masker."""
        found: list[str] = []

        def walk(node: Any) -> None:
            if isinstance(node, SecretStr):
                value = node.get_secret_value()
                if value:
                    found.append(value)
                    found.extend(_url_password(value))
            elif isinstance(node, BaseModel):
                for name in type(node).model_fields:
                    walk(getattr(node, name))
            elif isinstance(node, dict):
                for value in node.values():
                    walk(value)

        walk(self)
        return sorted(set(found), key=len, reverse=True)


# Safe defaults per environment; anything set explicitly wins.
ENVIRONMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    # Human-readable logs, quick retries, leases that lapse soon after a crash.
    "development": {
        "log": {"json_output": False},
        "retry": {"base_delay_seconds": 0.5, "max_delay_seconds": 30.0},
        "idempotency": {"lease_ttl_seconds": 30.0},
    },
    # Fast, deterministic runs: no jitter, short delays and leases.
    "testing": {
        "log": {"level": "DEBUG"},
        "retry": {"jitter": "none", "base_delay_seconds": 0.2, "max_delay_seconds": 2.0},
        "idempotency": {"lease_ttl_seconds": 10.0, "result_ttl_seconds": 7200},
    },
    # Conservative: JSON logs, full jitter, long leases; an explicit Redis URL is required.
    "production": {"log": {"json_output": True, "level": "INFO"}, "retry": {"jitter": "full"}},
}


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _url_password(url: str) -> list[str]:
    """The password part of a URL such as ``redis://:pw@host``, so it is masked alone too."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [password] if password else []


def _describe(error: ErrorDetails) -> str:
    path = [str(p) for p in error.get("loc", ()) if not isinstance(p, int)]
    variable = ENV_PREFIX + NESTED_DELIMITER.join(path).upper() if path else "settings"
    got = error.get("input")
    got_text = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{variable}: {error.get('msg', 'invalid value')}{got_text}"


class SettingsError(SystemExit):
    """A configuration value is invalid; the message names the variable."""


def load_settings(**overrides: Any) -> Settings:
    """Read settings; on a bad value exit with a message naming each wrong variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        message = "invalid configuration:\n  " + "\n  ".join(lines)
        raise SettingsError(message) from None
    except SourceError as exc:
        # A list/object value that is not JSON fails in pydantic-settings, before validation.
        raise SettingsError(f"invalid configuration:\n  {_describe_source(exc)}") from None


def _describe_source(exc: SourceError) -> str:
    bad = getattr(exc.__cause__, "doc", None)
    names = sorted(
        k
        for k, v in os.environ.items()
        if bad is not None and v == bad and k.upper().startswith(ENV_PREFIX)
    )
    variable = ", ".join(names) or "settings"
    return f'{variable}: {exc}; list and object values must be JSON, e.g. \'["a", "b"]\''
