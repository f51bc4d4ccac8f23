"""Typed settings, loaded once at start-up from TOML files plus ``LEADFLOW_*`` env.

Four files live in one configuration directory (default: ``config/`` of this
checkout, or ``$LEADFLOW_CONFIG_DIR``): ``engine.toml`` (connections, topics,
keys, limits, dataflow), ``scoring.toml`` (rules, decay, MQL threshold),
``routing.toml`` (queues) and ``roster.toml`` (SDRs). Every key is documented in
the README; an unknown key, a wrong type or an out-of-range value stops start-up
with a :class:`ConfigError` naming the file, the key and what is wrong.

Environment overrides (applied after the files):

* ``LEADFLOW_KAFKA_BOOTSTRAP`` -> ``kafka.bootstrap``
* ``LEADFLOW_KAFKA_OPT_<NAME>`` -> ``kafka.options``; ``<NAME>`` is the librdkafka
  option upper-cased with dots as underscores (``SASL_PASSWORD`` -> ``sasl.password``)
* ``LEADFLOW_REDIS_URL`` -> ``redis.url`` (``redis://``, ``rediss://`` for TLS,
  ``user:password@`` for AUTH/ACL)
* ``LEADFLOW_PROCESSES`` -> ``dataflow.processes``
* ``LEADFLOW_RECOVERY_DIR`` -> ``dataflow.recovery_dir`` ('' turns recovery off)
* ``LEADFLOW_METRICS_PORT`` -> ``metrics.port``
* ``LEADFLOW_HEALTH_PORT`` -> ``metrics.health_port``
* ``LEADFLOW_ALERTS_METRICS_PORT`` -> ``metrics.alerts_port``
* ``LEADFLOW_API_PORT`` / ``LEADFLOW_API_LISTEN`` -> ``api.port`` / ``api.listen``
* ``LEADFLOW_COLLECTOR_PORT`` / ``LEADFLOW_COLLECTOR_LISTEN`` -> ``collector.port`` / ``.listen``

Any ``LEADFLOW_*`` variable (these, and webhook secrets such as
``LEADFLOW_WEBHOOK_SECRET``) may instead name a file holding the value:
``<NAME>_FILE=/run/secrets/x`` (Docker and Kubernetes secrets), read at
start-up, trailing newline dropped (:func:`with_secret_files`).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
CONFIG_FILES = ("engine.toml", "scoring.toml", "routing.toml", "roster.toml")
MASK = "***"
# librdkafka option names that carry secrets; their values are never printed.
_SECRET_OPTION = re.compile(r"password|secret|sasl\.oauthbearer\.config|ssl\.key\.pem", re.I)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ONE_ID_LIKE = re.compile(r"[0-9a-f]{16}")


class ConfigError(ValueError):
    """Invalid configuration: says which file, which key and what is wrong."""

    def __init__(self, file: str, key: str, problem: str):
        super().__init__(f"{file}: {key}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class KafkaSettings:
    """Connection to the Kafka-protocol cluster."""

    bootstrap: str = "127.0.0.1:9092"
    # Extra librdkafka options for every client (SASL, TLS, ...).
    options: Mapping[str, str] = field(default_factory=dict)
    # Max messages per poll per partition; Bytewax's per-item cost drops ~5x
    # between batches of 1 and 100+ (shared/BYTEWAX.md).
    source_batch_size: int = 1000
    # librdkafka waits this long for a fetch to fill; its 500 ms default puts
    # ~190 ms on p50 latency on a lightly loaded topic.
    fetch_wait_max_ms: int = 10
    # An input position beyond its partition's end (the broker lost its log):
    # "earliest" reads the partition again from its start, "stop" refuses to start.
    on_input_reset: str = "earliest"


@dataclass(frozen=True)
class TopicSettings:
    """Names of the topics the engine reads and writes."""

    events: str = "leadflow.events"
    feedback: str = "leadflow.feedback"
    decisions: str = "leadflow.decisions"
    lifecycle: str = "leadflow.lifecycle"
    dlq: str = "leadflow.dlq"
    parked_alerts: str = "leadflow.alerts.parked"  # webhook alerts that could not be delivered
    # Partition count `leadflow topics create` uses when not told otherwise.
    partitions: int = 1

    def all(self) -> tuple[str, ...]:
        """Every topic name, inputs first."""
        return (
            self.events,
            self.feedback,
            self.decisions,
            self.lifecycle,
            self.dlq,
            self.parked_alerts,
        )


@dataclass(frozen=True)
class RedisSettings:
    """Connection to Redis and the layout of our keys."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "lf:"
    # Redis Cluster: batch scripts are grouped per hash slot and reads split per slot.
    cluster: bool = False
    # Retries with backoff before a batch gives up on Redis and the process exits
    # (Bytewax recovery then replays the batch).
    retries: int = 12


@dataclass(frozen=True)
class LimitSettings:
    """Guards on input and on per-person state size."""

    max_event_bytes: int = 32_768
    # How many recent messageIds each person remembers for de-duplication.
    dedup_window: int = 64
    # Output records kept per person for replay (re-emitted, never recomputed).
    outbox_size: int = 8
    # Events stamped further than this ahead of their ingest time are rejected.
    max_future_skew_s: int = 86_400
    # Untrusted events one person may send per minute (broker time); the rest go to
    # the DLQ as "rate_limited", unscored. 0 = no limit.
    max_events_per_minute: int = 120
    # A person's state expires after this many days without an event. 0 = never.
    retention_days: int = 730
    # The same track (name and properties) again within this many hours of event time
    # is a duplicate submission and scores nothing; later it scores again. 0 = never.
    duplicate_submission_hours: float = 24.0
    # When applying one person's events raises: "dlq" sends those events to the DLQ
    # (reason processing_error) and goes on with everyone else; "stop" stops the flow.
    on_processing_error: str = "dlq"


ON_PROCESSING_ERROR = ("dlq", "stop")
CHANNELS = ("email", "sms", "phone", "push")
# EU and EEA member states and the UK: consent must be given, never pre-ticked (GDPR, PECR).
GDPR_COUNTRIES = (
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT",
    "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI", "NO",
    "GB",
)  # fmt: skip


@dataclass(frozen=True)
class ConsentPolicy:
    """The consent rules of a group of countries.

    ``opt_in`` channels may be used only with an explicit grant that was not
    pre-ticked; the other channels may be used unless denied or revoked.
    """

    name: str
    countries: tuple[str, ...]
    opt_in: tuple[str, ...]


@dataclass(frozen=True)
class ConsentSettings:
    """Country consent policies; a country no policy names gets ``default``."""

    policies: tuple[ConsentPolicy, ...] = (
        ConsentPolicy("gdpr", GDPR_COUNTRIES, CHANNELS),
        ConsentPolicy("pipl", ("CN",), CHANNELS),
    )
    default: ConsentPolicy = ConsentPolicy("default", (), ("sms", "push"))
    # Segment consent-manager categories (context.consent.categoryPreferences, lower-cased)
    # -> the channels a true grants and a false denies. None by default: consent is never
    # guessed from a category nobody mapped.
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def policy_for(self, country: str) -> ConsentPolicy:
        """The policy of an ISO 3166 alpha-2 country ('' or unknown: the default)."""
        for policy in self.policies:
            if country in policy.countries:
                return policy
        return self.default


CLOCKS = ("wall", "event")
IDENTITY_LOOKUPS = ("auto", "on", "off")


@dataclass(frozen=True)
class DataflowSettings:
    """How the Bytewax dataflow runs."""

    processes: int = 1
    workers_per_process: int = 1
    # First port of the Bytewax cluster on this host (process i uses base + i).
    cluster_base_port: int = 2101
    # Directory of Bytewax recovery partitions; empty = recovery off.
    recovery_dir: str = "var/recovery"
    snapshot_interval_s: float = 10.0
    # Stop at the end of the input instead of waiting for more (replays, tests).
    stop_at_end: bool = False
    # "wall": records are stamped and SDRs picked by the clock (live). "event": by each
    # event's own time (a replay of history; needs stop_at_end: no timer fires).
    clock: str = "wall"
    # Known people's events skip the one resolver (dataflows.stages.IdentityLookup):
    # "auto" = when the flow has more than one worker, "on", "off".
    identity_lookup: str = "auto"
    # Decoded person states each worker keeps between batches (engine.state_cache), 3-6 KB
    # each with their stored bytes; 0 = none, every batch decodes what it loads.
    state_cache_size: int = 20_000

    def looks_up_identity(self, workers: int) -> bool:
        """Whether a flow of ``workers`` workers finds known people on every worker.

        On one worker there is nothing to spread, and keeping every event on the
        resolver's path keeps one partition's run reproducible to the SDR: a
        known person's event overtaking an earlier new person's changes whose
        promotion the round robin sees first (as interleaved partitions do).
        """
        return self.identity_lookup == "on" or (self.identity_lookup == "auto" and workers > 1)


@dataclass(frozen=True)
class MetricsSettings:
    """Where Prometheus scrapes the engine."""

    # Process i of a local cluster serves /metrics on port + i; 0 turns it off.
    port: int = 3030
    # Process i serves /livez and /readyz on health_port + i; 0 turns them off.
    health_port: int = 8086
    # ``leadflow alerts`` serves its own /metrics here; 0 turns it off.
    alerts_port: int = 3099
    # The address /metrics and the health probes listen on: every interface for a
    # service Prometheus and Kubernetes reach from outside; demo and up use loopback.
    listen: str = "0.0.0.0"


@dataclass(frozen=True)
class IdentifierKind:
    """A kind of identifier: where to find it, how strong it is, how many one person may hold."""

    name: str
    priority: int  # lower is stronger
    limit: int  # values of this kind one person may hold
    # Dotted paths in the event for kinds declared in config (built-in kinds have their own).
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class IdentitySettings:
    """How identifiers are read, normalised and joined into One-IDs."""

    # Keyed into every identifier and One-ID digest, so identifiers cannot be
    # recovered from Redis keys by hashing guessed e-mails.
    salt: str = "leadflow"
    kinds: tuple[IdentifierKind, ...] = (
        IdentifierKind("user", 1, 1),
        IdentifierKind("email", 2, 1),
        IdentifierKind("phone", 3, 1),
        IdentifierKind("anon", 5, 5),
    )
    # Mailbox domains where dots in the local part do not matter (Gmail-style).
    fold_dots_domains: tuple[str, ...] = ("gmail.com", "googlemail.com")
    # Drop "+tag" from local parts (ana+news@x == ana@x).
    fold_plus: bool = True
    # Country calling code for phone numbers written without one (E.164).
    default_calling_code: str = "1"
    # An erased person's identifiers refuse events older than the erasure for this long.
    erasure_block_days: int = 30


@dataclass(frozen=True)
class ScoringRule:
    """Points awarded to a person for one kind of event."""

    name: str
    type: str
    points: float
    # track: exact event name; page: glob over the URL path ('' = any).
    event: str = ""
    path: str = ""
    # Conditions on the event: dotted path -> allowed values (any of them).
    where: tuple[tuple[str, tuple[str | int | float | bool, ...]], ...] = ()
    # At most `cap` awards per `cap_period_days` (0 days = ever): the earliest
    # events of each period by event time count, whatever order they arrive in.
    cap: int = 0
    cap_period_days: float = 1.0
    # Named score dimensions (product lines, interests) this rule also feeds.
    dimensions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dimension:
    """A named behaviour score with its own decay and threshold (e.g. a product line)."""

    name: str
    half_life_days: float
    mql_threshold: float


@dataclass(frozen=True)
class ScoringSettings:
    """The behaviour score and the MQL threshold."""

    half_life_days: float = 30.0
    mql_threshold: float = 100.0
    rules: tuple[ScoringRule, ...] = ()
    dimensions: tuple[Dimension, ...] = ()
    # How many contributions a decision cites as its reasons.
    reasons: int = 3
    # "No interaction for `inactivity_period_days` costs `inactivity_points`",
    # once per whole period since the last event (0 = off).
    inactivity_points: float = 0.0
    inactivity_period_days: float = 30.0


@dataclass(frozen=True)
class SeniorityLevel:
    """Job titles matching any pattern (case-insensitive regex) earn ``points``."""

    name: str
    points: float
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class SizeBand:
    """Companies with ``min``..``max`` employees (inclusive) earn ``points``."""

    min: int
    max: int
    points: float


@dataclass(frozen=True)
class FitSettings:
    """Profile fit: points per trait of the person and their company."""

    company_email_points: float = 0.0
    seniority: tuple[SeniorityLevel, ...] = ()
    company_size: tuple[SizeBand, ...] = ()
    # Country (ISO 3166 alpha-2, upper case) -> points; "*" for any other.
    countries: Mapping[str, float] = field(default_factory=dict)
    # Industry (lower case) -> points; "*" for any other.
    industries: Mapping[str, float] = field(default_factory=dict)
    # Points per MQL field present (company_name, company_email, mobile, title, company_size).
    completeness: Mapping[str, float] = field(default_factory=dict)
    # Points per BANT answer given (budget, authority, need, timing).
    bant: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GradeSettings:
    """The lead grade: a fit band (a letter) and an engagement band (a digit), e.g. "A1".

    Each band is ``(name, minimum)``, best first: a lead takes the first band whose
    minimum its score reaches (the last band's minimum is 0: everyone has one).
    """

    fit_bands: tuple[tuple[str, float], ...] = (("A", 70.0), ("B", 45.0), ("C", 25.0), ("D", 0.0))
    engagement_bands: tuple[tuple[str, float], ...] = (
        ("1", 150.0),
        ("2", 100.0),
        ("3", 50.0),
        ("4", 0.0),
    )


@dataclass(frozen=True)
class CleansingSettings:
    """What disqualifies a lead before anything counts."""

    test_email_patterns: tuple[str, ...] = ()
    test_name_patterns: tuple[str, ...] = ()
    internal_domains: tuple[str, ...] = ()
    competitor_domains: tuple[str, ...] = ()
    disposable_domains: frozenset[str] = frozenset()
    free_mail_domains: frozenset[str] = frozenset()
    # Regexes over a phone's national digits that mark it as made up.
    fake_phone_patterns: tuple[str, ...] = ()
    # A whole number of at least this many digits in one ascending or descending run is fake.
    consecutive_phone_digits: int = 6


MQL_FIELDS = ("company_name", "company_email", "mobile", "title", "company_size")
BANT = ("budget", "authority", "need", "timing")


@dataclass(frozen=True)
class QualificationSettings:
    """The MQL rule besides the behaviour threshold."""

    min_fit: float = 0.0
    required_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueueSettings:
    """One routing queue."""

    name: str
    sla_minutes: float = 30.0  # an MQL not accepted by then goes to the next SDR
    # With nobody available, wait at most this long, then go to ``fallback_queue`` (0: wait).
    max_wait_minutes: float = 0.0
    fallback_queue: str = ""
    sticky: bool = True  # a company (e-mail domain) keeps the SDR who had its first lead
    webhook_url: str = ""  # decisions of this queue are also POSTed here ('' = none)
    # Environment variable holding the HMAC-SHA256 key that signs the webhook's bodies
    # ("new,old" during a rotation: both sign). Required unless webhook_unsigned.
    webhook_secret_env: str = "LEADFLOW_WEBHOOK_SECRET"
    webhook_unsigned: bool = False  # explicitly send this queue's alerts unsigned
    # What the webhook receives: the decision's JSON, a Slack message (Block Kit, for an
    # incoming webhook) or a Microsoft Teams message (an Adaptive Card, same).
    webhook_format: str = "json"
    # The lead in your CRM, linked from the alert: a URL with placeholders among
    # LEAD_URL_FIELDS, e.g. "https://crm.example.com/leads?leadflow={one_id}" ('' = no link).
    lead_url: str = ""


WEBHOOK_FORMATS = ("json", "slack", "teams")
LEAD_URL_FIELDS = ("one_id", "decision_id", "queue", "sdr")


@dataclass(frozen=True)
class AlertSettings:
    """How ``leadflow alerts`` delivers decisions to webhooks."""

    retry_first_s: float = 1.0  # the first wait after a failed POST; doubles each try
    retry_max_s: float = 60.0  # the longest single wait (each wait is jittered: 50-100 %)
    give_up_after_s: float = 900.0  # still failing this long after the first try: parked
    timeout_s: float = 5.0  # per phase of a POST (connect, write, read, pool)
    remember_days: float = 30.0  # a delivered decision id is remembered this long (no re-send)


API_SCOPES = ("read", "feedback", "read_pii")


@dataclass(frozen=True)
class ApiKey:
    """A key of the HTTP API: only its digest is configured, never the key itself."""

    name: str  # who holds it; the actor of the feedback it posts
    digest: str  # "sha256:<hex>" of the key (``leadflow api key`` makes both)
    scopes: frozenset[str]


@dataclass(frozen=True)
class ApiSettings:
    """``leadflow api``: feedback and look-ups over HTTP."""

    port: int = 8088  # 0: off
    listen: str = "0.0.0.0"
    keys: tuple[ApiKey, ...] = ()


@dataclass(frozen=True)
class WriteKey:
    """A source's write key for ``leadflow collect``: configured as a digest only."""

    name: str  # the source ("website", "crm-sync"); stamped on its events
    digest: str  # "sha256:<hex>" of the key (``leadflow collect key`` makes both)
    topic: str = "events"  # "events" (untrusted: browsers) or "feedback" (trusted servers)
    # Events per second the key may send (a token bucket of one second's worth): 429 beyond.
    rate_per_s: float = 1000.0


@dataclass(frozen=True)
class CollectorSettings:
    """``leadflow collect``: Segment's HTTP Tracking API."""

    port: int = 8080  # 0: off
    listen: str = "0.0.0.0"
    keys: tuple[WriteKey, ...] = ()
    # Record the client's address as context.ip when the event has none (Segment does).
    record_ip: bool = True
    # Browser origins allowed to post (CORS); ["*"] for any site.
    cors_origins: tuple[str, ...] = ("*",)
    max_batch_bytes: int = 512_000  # a batch body, after gunzip (an event: limits.max_event_bytes)
    # Trust X-Forwarded-For from a proxy in front (its first address is the client's).
    trust_forwarded_for: bool = False


@dataclass(frozen=True)
class RoutingRule:
    """Leads matching every non-empty condition go to ``queue``; the first rule matching wins."""

    name: str
    queue: str
    countries: frozenset[str] = frozenset()  # ISO alpha-2, upper case
    regions: tuple[str, ...] = ()  # names from [routing.regions]
    min_company_size: int = 0
    max_company_size: int = 0  # 0: no upper bound
    industries: frozenset[str] = frozenset()  # lower case
    dimensions: frozenset[str] = frozenset()  # product lines the person qualified on
    campaigns: frozenset[str] = frozenset()  # campaign names of the first or latest touch


@dataclass(frozen=True)
class RoutingSettings:
    """Queues MQLs are routed to."""

    default_queue: str = "inbound"
    queues: tuple[QueueSettings, ...] = (QueueSettings("inbound"),)
    rules: tuple[RoutingRule, ...] = ()
    regions: Mapping[str, frozenset[str]] = field(default_factory=dict)  # name -> countries

    def queue(self, name: str) -> QueueSettings:
        """The queue called ``name``."""
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)


@dataclass(frozen=True)
class Sdr:
    """A sales development rep on the roster, with their share and availability."""

    id: str
    queue: str
    name: str = ""
    weight: float = 1.0  # share of the queue's leads relative to the others
    daily_cap: int = 0  # most leads per day in the SDR's time zone (0: no cap)
    weekly_cap: int = 0  # most leads per ISO week (0: no cap)
    timezone: str = "UTC"
    working_hours: tuple[str, str] = ("", "")  # ("09:00", "18:00") local; empty: any time
    working_days: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)  # ISO weekdays, Monday = 1
    out_of_office: tuple[tuple[str, str], ...] = ()  # inclusive local dates, "2026-12-24"


@dataclass(frozen=True)
class RosterSettings:
    """Who takes leads, per queue."""

    sdrs: tuple[Sdr, ...] = ()
    version: int = 0  # 0: from roster.toml; else the version applied to Redis

    def for_queue(self, queue: str) -> tuple[Sdr, ...]:
        """The SDRs of ``queue`` in roster order."""
        return tuple(s for s in self.sdrs if s.queue == queue)


@dataclass(frozen=True)
class LifecycleSettings:
    """What sales feedback does to a person, and the lifecycle timers."""

    # A rejection with one of these reasons disqualifies; any other reason recycles.
    disqualify_reasons: tuple[str, ...] = ("spam", "competitor", "not_a_lead")
    recycle_score_factor: float = 0.5  # every behaviour score is multiplied by this on recycle
    recycle_days: float = 30.0  # a recycled person re-enters nurture after this many days
    demote_on_decay: bool = True  # an unaccepted MQL falls back when decay takes it below
    # A promotion whose qualifying scores have decayed below their bars by the time it is
    # processed (late or backfilled events) is recorded as "late_promotion" and sent to
    # no SDR; true alerts it anyway.
    alert_late_promotions: bool = False


@dataclass(frozen=True)
class Settings:
    """Everything the engine needs, validated."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topics: TopicSettings = field(default_factory=TopicSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    dataflow: DataflowSettings = field(default_factory=DataflowSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    fit: FitSettings = field(default_factory=FitSettings)
    grade: GradeSettings = field(default_factory=GradeSettings)
    cleansing: CleansingSettings = field(default_factory=CleansingSettings)
    qualification: QualificationSettings = field(default_factory=QualificationSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    roster: RosterSettings = field(default_factory=RosterSettings)
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    consent: ConsentSettings = field(default_factory=ConsentSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    collector: CollectorSettings = field(default_factory=CollectorSettings)
    config_dir: str = str(DEFAULT_CONFIG_DIR)


class _Table:
    """A TOML table being read: remembers file and key path for error messages."""

    def __init__(self, file: str, path: str, data: Mapping[str, Any]):
        self.file = file
        self.path = path
        self.data = data
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self._key(key), problem)

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        return self.data.get(key, default)

    def text(self, key: str, default: str, *, pattern: re.Pattern[str] | None = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_show(value)}")
        if pattern is not None and not pattern.match(value):
            raise self.error(key, f"{value!r} is not a valid name (letters, digits, _ . -)")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_show(value)}")
        return value

    def integer(self, key: str, default: int, *, min: int, max: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_show(value)}")
        if value < min or (max is not None and value > max):
            bounds = f">= {min}" if max is None else f"between {min} and {max}"
            raise self.error(key, f"must be {bounds}, got {value}")
        return value

    def number(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number, got {_show(value)}")
        if not math.isfinite(value):
            raise self.error(key, f"must be finite, got {value}")
        if positive and value <= 0:
            raise self.error(key, f"must be > 0, got {value}")
        return float(value)

    def strings(self, key: str) -> list[str]:
        value = self._get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"expected a list of strings, got {_show(value)}")
        return value

    def table(self, key: str) -> _Table:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_show(value)}")
        return _Table(self.file, self._key(key), value)

    def tables(self, key: str) -> list[_Table]:
        value = self._get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, f"expected an array of tables ([[{self._key(key)}]])")
        return [_Table(self.file, f"{self._key(key)}[{i}]", v) for i, v in enumerate(value)]

    def string_map(self, key: str) -> dict[str, str]:
        t = self.table(key)
        out: dict[str, str] = {}
        for k, v in t.data.items():
            if not isinstance(v, str | int | float):
                raise t.error(k, f"expected a string or number, got {_show(v)}")
            # librdkafka wants "true"/"false", not Python's "True"/"False".
            out[k] = ("true" if v else "false") if isinstance(v, bool) else str(v)
        t.used.update(t.data)
        return out

    def done(self) -> None:
        """Reject keys nobody read: a typo must not silently fall back to a default."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key (check the spelling; see README)")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _read_file(directory: Path, name: str) -> _Table:
    path = directory / name
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "-", "file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), "-", f"not valid TOML: {e}") from None
    return _Table(str(path), "", data)


def load_settings(
    config_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Read, override from the environment and validate all configuration.

    Args:
        config_dir: directory holding the four TOML files; defaults to
            ``$LEADFLOW_CONFIG_DIR`` or the ``config/`` folder of this checkout.
        env: environment to read overrides from (defaults to ``os.environ``).

    Raises:
        ConfigError: on the first problem found, naming file, key and problem.
    """
    env = with_secret_files(os.environ if env is None else env)
    directory = Path(config_dir or env.get("LEADFLOW_CONFIG_DIR") or DEFAULT_CONFIG_DIR)
    engine, scoring, routing, roster = (_read_file(directory, n) for n in CONFIG_FILES)
    settings = Settings(
        kafka=_kafka(engine.table("kafka"), env),
        topics=_topics(engine.table("topics")),
        redis=_redis(engine.table("redis"), env),
        limits=_limits(engine.table("limits")),
        dataflow=_dataflow(engine.table("dataflow"), env),
        metrics=_metrics(engine.table("metrics"), env),
        identity=_identity(engine.table("identity"), env),
        scoring=_scoring(scoring.table("scoring")),
        fit=_fit(scoring.table("fit")),
        grade=_grade(scoring.table("grade")),
        cleansing=_cleansing(scoring.table("cleansing"), directory),
        qualification=_qualification(scoring.table("qualification")),
        routing=_routing(routing.table("routing")),
        roster=roster_from(roster),
        lifecycle=_lifecycle(routing.table("lifecycle")),
        consent=_consent(engine.table("consent")),
        alerts=_alerts(engine.table("alerts")),
        api=_api(engine.table("api"), env),
        collector=_collector(engine.table("collector"), env),
        config_dir=str(directory),
    )
    for t in (engine, scoring, routing, roster):
        t.done()
    check_roster(settings.roster, settings.routing, roster.file)
    return settings


def webhook_secrets(queue: QueueSettings, env: Mapping[str, str]) -> list[bytes]:
    """The keys that sign ``queue``'s webhook (the first is the current one)."""
    raw = env.get(queue.webhook_secret_env, "")
    return [part.strip().encode() for part in raw.split(",") if part.strip()]


def check_webhook_secrets(settings: Settings, env: Mapping[str, str]) -> None:
    """Refuse a queue that would POST alerts signed with an empty key.

    A receiver can trust an alert only if it is signed with a secret they share;
    a missing variable used to sign with an empty key, which anyone can forge.
    A queue may opt out explicitly (``webhook_unsigned = true``).
    """
    for i, queue in enumerate(settings.routing.queues):
        if queue.webhook_url and not queue.webhook_unsigned and not webhook_secrets(queue, env):
            raise ConfigError(
                str(Path(settings.config_dir) / "routing.toml"),
                f"routing.queues[{i}].webhook_secret_env",
                f"queue {queue.name!r} has a webhook but {queue.webhook_secret_env} is not set:"
                f" set it (or {queue.webhook_secret_env}_FILE) to a long random secret the"
                " receiver shares, or mark the queue webhook_unsigned = true",
            )


# Where a supervised member of a local cluster writes why it failed (leadflow.runner);
# not *_FILE: that suffix names a secret file (with_secret_files).
MEMBER_ERRORS = "LEADFLOW_MEMBER_ERRORS"
SHIPPED_SALT = IdentitySettings.salt
# Set by the embedded demo and the tests, whose identifiers are made up.
ALLOW_SHIPPED_SALT = "LEADFLOW_ALLOW_SHIPPED_SALT"


def check_private_salt(settings: Settings, env: Mapping[str, str]) -> None:
    """Refuse the shipped identity salt for real data.

    Identifier digests are keyed by the salt; with the public one, a digest is a
    reversible hash of an e-mail address (anyone can hash a list of addresses).
    Only the embedded demo and the tests, which make their identifiers up, may
    use it (they set ``LEADFLOW_ALLOW_SHIPPED_SALT=1``).
    """
    if settings.identity.salt == SHIPPED_SALT and env.get(ALLOW_SHIPPED_SALT) != "1":
        raise ConfigError(
            str(Path(settings.config_dir) / "engine.toml"),
            "identity.salt",
            "is the shipped, public salt: set a secret of your own (a long random string; env "
            "LEADFLOW_IDENTITY_SALT or LEADFLOW_IDENTITY_SALT_FILE) and keep it stable",
        )


def with_secret_files(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` plus, for every ``LEADFLOW_<NAME>_FILE``, ``LEADFLOW_<NAME>`` = the file's content.

    A variable set directly wins over its file. An unreadable file stops start-up
    with a :class:`ConfigError` naming the variable (never the content).
    """
    out = dict(env)
    for name, path in env.items():
        target = name.removesuffix("_FILE")
        if target == name or not name.startswith("LEADFLOW_") or target in env:
            continue
        try:
            out[target] = Path(path).read_text().rstrip("\r\n")
        except OSError as e:
            raise ConfigError("env", name, f"cannot read {path}: {e.strerror}") from None
    return out


def _kafka(t: _Table, env: Mapping[str, str]) -> KafkaSettings:
    options = t.string_map("options")
    for name, value in env.items():
        if name.startswith("LEADFLOW_KAFKA_OPT_"):
            options[name.removeprefix("LEADFLOW_KAFKA_OPT_").lower().replace("_", ".")] = value
    s = KafkaSettings(
        bootstrap=env.get("LEADFLOW_KAFKA_BOOTSTRAP")
        or t.text("bootstrap", KafkaSettings.bootstrap),
        options=options,
        source_batch_size=t.integer("source_batch_size", 1000, min=1, max=100_000),
        fetch_wait_max_ms=t.integer("fetch_wait_max_ms", 10, min=0, max=60_000),
        on_input_reset=t.text("on_input_reset", "earliest"),
    )
    if s.on_input_reset not in ("earliest", "stop"):
        raise t.error("on_input_reset", f'must be "earliest" or "stop", got {s.on_input_reset!r}')
    t.used.add("bootstrap")
    t.done()
    return s


def _topics(t: _Table) -> TopicSettings:
    d = TopicSettings()
    s = TopicSettings(
        events=t.text("events", d.events, pattern=_NAME),
        feedback=t.text("feedback", d.feedback, pattern=_NAME),
        decisions=t.text("decisions", d.decisions, pattern=_NAME),
        lifecycle=t.text("lifecycle", d.lifecycle, pattern=_NAME),
        dlq=t.text("dlq", d.dlq, pattern=_NAME),
        parked_alerts=t.text("parked_alerts", d.parked_alerts, pattern=_NAME),
        partitions=t.integer("partitions", 1, min=1, max=10_000),
    )
    t.done()
    if len(set(s.all())) != len(s.all()):
        raise t.error("-", "topic names must all be different")
    return s


def _redis(t: _Table, env: Mapping[str, str]) -> RedisSettings:
    url = env.get("LEADFLOW_REDIS_URL") or t.text("url", RedisSettings.url)
    t.used.add("url")
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        problem = f"must start with redis://, rediss:// or unix://, got {mask_url(url)!r}"
        if env.get("LEADFLOW_REDIS_URL"):  # the variable is what to fix, not the file
            raise ConfigError("env", "LEADFLOW_REDIS_URL", problem)
        raise t.error("url", problem)
    s = RedisSettings(
        url=url,
        key_prefix=t.text("key_prefix", RedisSettings.key_prefix),
        cluster=t.flag("cluster", False),
        retries=t.integer("retries", 12, min=0, max=100),
    )
    t.done()
    return s


def _limits(t: _Table) -> LimitSettings:
    s = LimitSettings(
        max_event_bytes=t.integer("max_event_bytes", 32_768, min=256, max=1_048_576),
        dedup_window=t.integer("dedup_window", 64, min=1, max=10_000),
        outbox_size=t.integer("outbox_size", 8, min=1, max=1_000),
        max_future_skew_s=t.integer("max_future_skew_s", 86_400, min=0),
        max_events_per_minute=t.integer("max_events_per_minute", 120, min=0),
        retention_days=t.integer("retention_days", 730, min=0, max=36_500),
        duplicate_submission_hours=t.number("duplicate_submission_hours", 24.0),
        on_processing_error=t.text("on_processing_error", "dlq"),
    )
    if s.duplicate_submission_hours < 0:
        raise t.error(
            "duplicate_submission_hours", f"must be >= 0, got {s.duplicate_submission_hours}"
        )
    if s.on_processing_error not in ON_PROCESSING_ERROR:
        raise t.error(
            "on_processing_error",
            f"must be one of {list(ON_PROCESSING_ERROR)}, got {s.on_processing_error!r}",
        )
    t.done()
    return s


def _consent(t: _Table) -> ConsentSettings:
    def channels(table: _Table, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        names = table.strings(key) if key in table.data else list(default)
        unknown = [c for c in names if c not in CHANNELS]
        if unknown:
            raise table.error(key, f"unknown channel {unknown[0]!r}; channels are {list(CHANNELS)}")
        return tuple(names)

    policies = []
    claimed: dict[str, str] = {}
    for pt in t.tables("policies"):
        name = pt.text("name", "", pattern=_NAME)
        countries = tuple(c.upper() for c in pt.strings("countries"))
        for c in countries:
            if not re.fullmatch(r"[A-Z]{2}", c):
                raise pt.error("countries", f"{c!r} is not an ISO 3166 alpha-2 code")
            if c in claimed:
                raise pt.error("countries", f"{c} is already in policy {claimed[c]!r}")
            claimed[c] = name
        policies.append(ConsentPolicy(name, countries, channels(pt, "opt_in", CHANNELS)))
        pt.done()
    categories_t = t.table("categories")
    categories = {name.lower(): channels(categories_t, name, ()) for name in categories_t.data}
    categories_t.done()
    d = ConsentSettings()
    s = ConsentSettings(
        policies=tuple(policies) if "policies" in t.data else d.policies,
        default=ConsentPolicy("default", (), channels(t, "default_opt_in", d.default.opt_in)),
        categories=categories,
    )
    t.done()
    return s


def _dataflow(t: _Table, env: Mapping[str, str]) -> DataflowSettings:
    processes = t.integer("processes", 1, min=1, max=256)
    if "LEADFLOW_PROCESSES" in env:
        raw = env["LEADFLOW_PROCESSES"]
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError("env", "LEADFLOW_PROCESSES", f"expected an integer >= 1, got {raw!r}")
        processes = int(raw)
    s = DataflowSettings(
        processes=processes,
        workers_per_process=t.integer("workers_per_process", 1, min=1, max=64),
        cluster_base_port=t.integer("cluster_base_port", 2101, min=1024, max=65000),
        recovery_dir=env.get("LEADFLOW_RECOVERY_DIR", t.text("recovery_dir", "var/recovery")),
        snapshot_interval_s=t.number("snapshot_interval_s", 10.0, positive=True),
        stop_at_end=t.flag("stop_at_end", False),
        clock=t.text("clock", "wall"),
        identity_lookup=t.text("identity_lookup", "auto"),
        state_cache_size=t.integer("state_cache_size", 20_000, min=0, max=10_000_000),
    )
    if s.clock not in CLOCKS:
        raise t.error("clock", f"expected one of {', '.join(CLOCKS)}, got {s.clock!r}")
    if s.identity_lookup not in IDENTITY_LOOKUPS:
        choices = ", ".join(IDENTITY_LOOKUPS)
        raise t.error("identity_lookup", f"expected one of {choices}, got {s.identity_lookup!r}")
    t.done()
    return s


def _port(t: _Table, key: str, default: int, variable: str, env: Mapping[str, str]) -> int:
    """A port from ``t``, overridden by the environment variable ``variable``."""
    value = t.integer(key, default, min=0, max=65535)
    if variable in env:
        raw = env[variable]
        if not raw.isdigit() or int(raw) > 65535:
            raise ConfigError("env", variable, f"expected a port 0..65535, got {raw!r}")
        value = int(raw)
    return value


def _metrics(t: _Table, env: Mapping[str, str]) -> MetricsSettings:
    t.used.add("listen")  # read below, or overridden by the environment
    s = MetricsSettings(
        port=_port(t, "port", 3030, "LEADFLOW_METRICS_PORT", env),
        health_port=_port(t, "health_port", 8086, "LEADFLOW_HEALTH_PORT", env),
        alerts_port=_port(t, "alerts_port", 3099, "LEADFLOW_ALERTS_METRICS_PORT", env),
        listen=env.get("LEADFLOW_METRICS_LISTEN") or t.text("listen", "0.0.0.0"),
    )
    t.done()
    return s


def _identity(t: _Table, env: Mapping[str, str]) -> IdentitySettings:
    d = IdentitySettings()
    kinds = {k.name: k for k in d.kinds}
    table = t.table("kinds")
    for name in sorted(table.data):
        kt = table.table(name)
        if not _NAME.match(name):
            raise kt.error("-", f"{name!r} is not a valid identifier kind name")
        if _ONE_ID_LIKE.fullmatch(name):
            # The identity keys tell a kind from a One-ID by this shape (engine.store).
            raise kt.error("-", f"{name!r}: a kind may not be named like a One-ID (16 hex digits)")
        base = kinds.get(name)
        paths = tuple(kt.strings("paths"))
        if base is None and not paths:
            raise kt.error("paths", f"a new kind {name!r} needs the event paths it is read from")
        if base is not None and paths:
            raise kt.error("paths", f"built-in kind {name!r} is read from its fixed places")
        kinds[name] = IdentifierKind(
            name,
            kt.integer("priority", base.priority if base else 4, min=1, max=100),
            kt.integer("limit", base.limit if base else 1, min=1, max=1000),
            paths,
        )
        for path in paths:
            if not path.startswith(("traits.", "context.", "properties.")):
                raise kt.error(
                    "paths", f"{path!r} must start with traits., context. or properties."
                )
        kt.done()
    t.used.add("salt")  # read below, or overridden by the environment
    s = IdentitySettings(
        salt=env.get("LEADFLOW_IDENTITY_SALT") or t.text("salt", d.salt),
        kinds=tuple(sorted(kinds.values(), key=lambda k: (k.priority, k.name))),
        fold_dots_domains=tuple(
            x.lower() for x in t.strings("fold_dots_domains") or d.fold_dots_domains
        ),
        fold_plus=t.flag("fold_plus", d.fold_plus),
        default_calling_code=t.text("default_calling_code", d.default_calling_code),
        erasure_block_days=t.integer("erasure_block_days", d.erasure_block_days, min=1),
    )
    if not s.salt:
        raise t.error("salt", "must not be empty")
    if not s.default_calling_code.isdigit() or len(s.default_calling_code) > 3:
        raise t.error("default_calling_code", 'must be 1 to 3 digits, e.g. "1", "55", "86"')
    t.done()
    return s


def _scoring(t: _Table) -> ScoringSettings:
    dimensions = []
    dims = t.table("dimensions")
    for name in sorted(dims.data):
        dt = dims.table(name)
        if not _NAME.match(name):
            raise dt.error("-", f"{name!r} is not a valid dimension name")
        dimensions.append(
            Dimension(
                name=name,
                half_life_days=dt.number("half_life_days", 30.0, positive=True),
                mql_threshold=dt.number("mql_threshold", 100.0, positive=True),
            )
        )
        dt.done()
    known_dims = {d.name for d in dimensions}
    rules = [_rule(r, known_dims) for r in t.tables("rules")]
    names = [r.name for r in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise t.error("rules", f"rule name {dupes[0]!r} is used more than once")
    s = ScoringSettings(
        half_life_days=t.number("half_life_days", 30.0, positive=True),
        mql_threshold=t.number("mql_threshold", 100.0, positive=True),
        rules=tuple(rules),
        dimensions=tuple(dimensions),
        reasons=t.integer("reasons", 3, min=1, max=20),
        inactivity_points=t.number("inactivity_points", 0.0),
        inactivity_period_days=t.number("inactivity_period_days", 30.0, positive=True),
    )
    if s.inactivity_points < 0:
        raise t.error("inactivity_points", "is a cost: give it as a positive number")
    t.done()
    return s


def _rule(r: _Table, known_dims: set[str]) -> ScoringRule:
    where = []
    wt = r.table("where")
    for path, value in wt.data.items():
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values or not all(isinstance(v, str | int | float | bool) for v in values):
            raise wt.error(path, "expected a string, number, boolean or a list of them")
        if not path.startswith(("properties.", "traits.", "context.")):
            raise wt.error(path, "must start with properties., traits. or context.")
        where.append((path, values))
    wt.used.update(wt.data)
    rule = ScoringRule(
        name=r.text("name", "", pattern=_NAME),
        type=r.text("type", ""),
        points=r.number("points", 0.0),
        event=r.text("event", ""),
        path=r.text("path", ""),
        where=tuple(where),
        cap=r.integer("cap", 0, min=0),
        cap_period_days=r.number("cap_period_days", 1.0),
        dimensions=tuple(r.strings("dimensions")),
    )
    if rule.type not in ("track", "page"):
        raise r.error("type", f"must be 'track' or 'page', got {rule.type!r}")
    if rule.type == "track" and not rule.event:
        raise r.error("event", "a track rule needs the event name it scores")
    if rule.type == "page" and rule.event:
        raise r.error("event", "page rules match on 'path', not 'event'")
    if rule.points == 0:
        raise r.error("points", "must not be 0")
    if rule.cap_period_days < 0:
        raise r.error("cap_period_days", "must be >= 0 (0 = over the person's whole life)")
    for d in rule.dimensions:
        if d not in known_dims:
            raise r.error(
                "dimensions", f"unknown dimension {d!r}; declare [scoring.dimensions.{d}]"
            )
    r.done()
    return rule


def _points_map(t: _Table, key: str, allowed: tuple[str, ...] | None = None) -> dict[str, float]:
    m = t.table(key)
    out = {}
    for k in m.data:
        if allowed is not None and k not in allowed:
            raise m.error(k, f"unknown; expected one of {', '.join(allowed)}")
        out[k] = m.number(k, 0.0)
    m.done()
    return out


def _fit(t: _Table) -> FitSettings:
    seniority = []
    for lt in t.tables("seniority"):
        level = SeniorityLevel(
            lt.text("name", "", pattern=_NAME),
            lt.number("points", 0.0),
            tuple(lt.strings("patterns")),
        )
        for i, pattern in enumerate(level.patterns):
            _compile(lt, f"patterns[{i}]", pattern)
        lt.done()
        seniority.append(level)
    bands = []
    for bt in t.tables("company_size"):
        band = SizeBand(
            bt.integer("min", 0, min=0), bt.integer("max", 10**9, min=0), bt.number("points", 0.0)
        )
        if band.max < band.min:
            raise bt.error("max", f"must be >= min ({band.min})")
        bt.done()
        bands.append(band)
    s = FitSettings(
        company_email_points=t.number("company_email_points", 0.0),
        seniority=tuple(seniority),
        company_size=tuple(bands),
        countries={k.upper(): v for k, v in _points_map(t, "countries").items()},
        industries={k.lower(): v for k, v in _points_map(t, "industries").items()},
        completeness=_points_map(t, "completeness", MQL_FIELDS),
        bant=_points_map(t, "bant", BANT),
    )
    t.done()
    return s


def _compile(t: _Table, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise t.error(key, f"invalid regular expression {pattern!r}: {e}") from None


def _domain_list(t: _Table, key: str, directory: Path) -> frozenset[str]:
    name = t.text(key, "")
    if not name:
        return frozenset()
    path = directory / name
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise t.error(key, f"cannot read {path}: {e.strerror}") from None
    return frozenset(
        d.strip().lower() for d in lines if d.strip() and not d.lstrip().startswith("#")
    )


def _cleansing(t: _Table, directory: Path) -> CleansingSettings:
    s = CleansingSettings(
        test_email_patterns=tuple(t.strings("test_email_patterns")),
        test_name_patterns=tuple(t.strings("test_name_patterns")),
        internal_domains=tuple(d.lower() for d in t.strings("internal_domains")),
        competitor_domains=tuple(d.lower() for d in t.strings("competitor_domains")),
        disposable_domains=_domain_list(t, "disposable_domains_file", directory),
        free_mail_domains=_domain_list(t, "free_mail_domains_file", directory),
        fake_phone_patterns=tuple(t.strings("fake_phone_patterns")),
        consecutive_phone_digits=t.integer("consecutive_phone_digits", 6, min=3, max=20),
    )
    for key in ("test_email_patterns", "test_name_patterns", "fake_phone_patterns"):
        for i, pattern in enumerate(getattr(s, key)):
            _compile(t, f"{key}[{i}]", pattern)
    t.done()
    return s


def _grade(t: _Table) -> GradeSettings:
    d = GradeSettings()

    def bands(key: str, default: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
        if key not in t.data:
            t.used.add(key)
            return default
        table = t.table(key)
        out = tuple(
            sorted(
                ((name, table.number(name, 0.0)) for name in table.data),
                key=lambda band: -band[1],
            )
        )
        table.done()
        if not out or out[-1][1] != 0:
            raise t.error(key, "the lowest band needs a minimum of 0, so every lead has a band")
        if any(not name or len(name) > 3 for name, _ in out):
            raise t.error(key, "band names are short: a letter or a digit, e.g. A or 1")
        return out

    s = GradeSettings(
        fit_bands=bands("fit_bands", d.fit_bands),
        engagement_bands=bands("engagement_bands", d.engagement_bands),
    )
    t.done()
    return s


def _qualification(t: _Table) -> QualificationSettings:
    s = QualificationSettings(
        min_fit=t.number("min_fit", 0.0), required_fields=tuple(t.strings("required_fields"))
    )
    for f in s.required_fields:
        if f not in MQL_FIELDS:
            raise t.error(
                "required_fields", f"unknown field {f!r}; expected some of {', '.join(MQL_FIELDS)}"
            )
    t.done()
    return s


def _routing(t: _Table) -> RoutingSettings:
    queues = []
    for q in t.tables("queues"):
        queues.append(
            QueueSettings(
                name=q.text("name", "", pattern=_NAME),
                sla_minutes=q.number("sla_minutes", 30.0, positive=True),
                max_wait_minutes=q.number("max_wait_minutes", 0.0),
                fallback_queue=q.text("fallback_queue", ""),
                sticky=q.flag("sticky", True),
                webhook_url=q.text("webhook_url", ""),
                webhook_secret_env=q.text("webhook_secret_env", "LEADFLOW_WEBHOOK_SECRET"),
                webhook_unsigned=q.flag("webhook_unsigned", False),
                webhook_format=q.text("webhook_format", "json"),
                lead_url=q.text("lead_url", ""),
            )
        )
        q.done()
    if not queues:
        raise t.error("queues", "at least one [[routing.queues]] is required")
    names = [q.name for q in queues]
    if len(set(names)) != len(names):
        raise t.error("queues", "queue names must be unique")
    for i, queue in enumerate(queues):
        if queue.fallback_queue and queue.fallback_queue not in names:
            raise t.error(f"queues[{i}].fallback_queue", f"unknown queue {queue.fallback_queue!r}")
        if queue.webhook_url and not queue.webhook_url.startswith(("http://", "https://")):
            raise t.error(f"queues[{i}].webhook_url", "must start with http:// or https://")
        if queue.max_wait_minutes < 0:
            raise t.error(f"queues[{i}].max_wait_minutes", "must be >= 0")
        if queue.webhook_format not in WEBHOOK_FORMATS:
            raise t.error(
                f"queues[{i}].webhook_format",
                f"{queue.webhook_format!r} is not one of {', '.join(WEBHOOK_FORMATS)}",
            )
        _check_lead_url(t, f"queues[{i}].lead_url", queue.lead_url)
    default = t.text("default_queue", names[0])
    if default not in names:
        raise t.error("default_queue", f"{default!r} is not one of the queues {names}")
    regions_t = t.table("regions")
    regions = {
        name: frozenset(c.upper() for c in regions_t.strings(name)) for name in regions_t.data
    }
    regions_t.done()
    rules = [_routing_rule(r, names, regions) for r in t.tables("rules")]
    t.done()
    return RoutingSettings(
        default_queue=default, queues=tuple(queues), rules=tuple(rules), regions=regions
    )


def _check_lead_url(t: _Table, key: str, template: str) -> None:
    if template and not template.startswith(("http://", "https://")):
        raise t.error(key, "must start with http:// or https://")
    for name in re.findall(r"{([^{}]*)}", template):
        if name not in LEAD_URL_FIELDS:
            raise t.error(
                key,
                f"unknown placeholder {{{name}}}; expected some of {', '.join(LEAD_URL_FIELDS)}",
            )


def _alerts(t: _Table) -> AlertSettings:
    s = AlertSettings(
        retry_first_s=t.number("retry_first_s", 1.0, positive=True),
        retry_max_s=t.number("retry_max_s", 60.0, positive=True),
        give_up_after_s=t.number("give_up_after_s", 900.0),
        timeout_s=t.number("timeout_s", 5.0, positive=True),
        remember_days=t.number("remember_days", 30.0, positive=True),
    )
    if s.give_up_after_s < 0:
        raise t.error("give_up_after_s", "must be >= 0")
    if s.retry_max_s < s.retry_first_s:
        raise t.error("retry_max_s", f"must be >= retry_first_s ({s.retry_first_s})")
    t.done()
    return s


_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def _api(t: _Table, env: Mapping[str, str]) -> ApiSettings:
    keys = []
    for k in t.tables("keys"):
        scopes = k.strings("scopes")
        for scope in scopes:
            if scope not in API_SCOPES:
                raise k.error("scopes", f"unknown scope {scope!r}; expected some of {API_SCOPES}")
        digest = _digest(k, "leadflow api key")
        keys.append(ApiKey(k.text("name", "", pattern=_NAME), digest, frozenset(scopes)))
        k.done()
    _unique_digests(t, [k.digest for k in keys])
    port, listen = _address(t, 8088, "LEADFLOW_API", env)
    s = ApiSettings(port=port, listen=listen, keys=tuple(keys))
    t.done()
    return s


def _address(t: _Table, port: int, env_prefix: str, env: Mapping[str, str]) -> tuple[int, str]:
    """A server's ``port`` and ``listen``, overridden by ``<env_prefix>_PORT`` / ``_LISTEN``."""
    t.used.add("listen")
    return (
        _port(t, "port", port, f"{env_prefix}_PORT", env),
        env.get(f"{env_prefix}_LISTEN") or t.text("listen", "0.0.0.0"),
    )


def _unique_digests(t: _Table, digests: list[str]) -> None:
    if len(set(digests)) != len(digests):
        raise t.error("keys", "two keys have the same digest")


def _digest(t: _Table, maker: str) -> str:
    digest = t.text("digest", "")
    if not _DIGEST.match(digest):
        raise t.error("digest", f"expected sha256:<64 hex digits> (make one with `{maker}`)")
    return digest


def _collector(t: _Table, env: Mapping[str, str]) -> CollectorSettings:
    keys = []
    for k in t.tables("keys"):
        key = WriteKey(
            name=k.text("name", "", pattern=_NAME),
            digest=_digest(k, "leadflow collect key"),
            topic=k.text("topic", "events"),
            rate_per_s=k.number("rate_per_s", 1000.0, positive=True),
        )
        if key.topic not in ("events", "feedback"):
            raise k.error("topic", f"expected 'events' or 'feedback', got {key.topic!r}")
        if key.topic == "feedback" and not k.flag("trusted", False):
            raise k.error(
                "trusted",
                "a key writing to the feedback topic must say trusted = true (a server-side"
                " source: never give it to a browser)",
            )
        k.used.add("trusted")
        keys.append(key)
        k.done()
    _unique_digests(t, [k.digest for k in keys])
    port, listen = _address(t, 8080, "LEADFLOW_COLLECTOR", env)
    s = CollectorSettings(
        port=port,
        listen=listen,
        keys=tuple(keys),
        record_ip=t.flag("record_ip", True),
        cors_origins=tuple(t.strings("cors_origins") if "cors_origins" in t.data else ["*"]),
        max_batch_bytes=t.integer("max_batch_bytes", 512_000, min=1024),
        trust_forwarded_for=t.flag("trust_forwarded_for", False),
    )
    t.done()
    return s


def _routing_rule(
    r: _Table, queues: list[str], regions: Mapping[str, frozenset[str]]
) -> RoutingRule:
    rule = RoutingRule(
        name=r.text("name", "", pattern=_NAME),
        queue=r.text("queue", ""),
        countries=frozenset(c.upper() for c in r.strings("countries")),
        regions=tuple(r.strings("regions")),
        min_company_size=r.integer("min_company_size", 0, min=0),
        max_company_size=r.integer("max_company_size", 0, min=0),
        industries=frozenset(i.lower() for i in r.strings("industries")),
        dimensions=frozenset(r.strings("dimensions")),
        campaigns=frozenset(r.strings("campaigns")),
    )
    if rule.queue not in queues:
        raise r.error("queue", f"unknown queue {rule.queue!r}; expected one of {queues}")
    for region in rule.regions:
        if region not in regions:
            raise r.error("regions", f"unknown region {region!r} (declare it in [routing.regions])")
    r.done()
    return rule


def _lifecycle(t: _Table) -> LifecycleSettings:
    s = LifecycleSettings(
        disqualify_reasons=tuple(t.strings("disqualify_reasons"))
        if "disqualify_reasons" in t.data
        else LifecycleSettings.disqualify_reasons,
        recycle_score_factor=t.number("recycle_score_factor", 0.5),
        recycle_days=t.number("recycle_days", 30.0),
        demote_on_decay=t.flag("demote_on_decay", True),
        alert_late_promotions=t.flag("alert_late_promotions", False),
    )
    if not 0 <= s.recycle_score_factor <= 1:
        raise t.error(
            "recycle_score_factor", f"must be between 0 and 1, got {s.recycle_score_factor}"
        )
    if s.recycle_days < 0:
        raise t.error("recycle_days", f"must be >= 0, got {s.recycle_days}")
    t.done()
    return s


_CLOCK = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def roster_from(t: _Table, version: int = 0) -> RosterSettings:
    """The roster in ``t`` (the ``[[sdrs]]`` of roster.toml, or the same data from Redis)."""
    sdrs = [_sdr(s) for s in t.tables("sdrs")]
    t.used.add("version")
    return RosterSettings(sdrs=tuple(sdrs), version=version)


def roster_data(data: Mapping[str, Any], source: str, version: int = 0) -> RosterSettings:
    """A roster from plain data (as stored in Redis), validated like roster.toml."""
    t = _Table(source, "", data)
    roster = roster_from(t, version)
    t.done()
    return roster


def _sdr(s: _Table) -> Sdr:
    hours = s.strings("working_hours")
    if hours and (len(hours) != 2 or not all(_CLOCK.match(h) for h in hours)):
        raise s.error("working_hours", f'expected ["HH:MM", "HH:MM"], got {hours!r}')
    days = s._get("working_days", [1, 2, 3, 4, 5, 6, 7])
    if not isinstance(days, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 7 for d in days
    ):
        raise s.error("working_days", f"expected ISO weekdays 1 (Monday) to 7, got {days!r}")
    ooo = []
    for i, period in enumerate(s._get("out_of_office", [])):
        if (
            not isinstance(period, list)
            or len(period) != 2
            or not all(isinstance(d, str) and _DATE.match(d) for d in period)
            or period[0] > period[1]
        ):
            raise s.error(
                f"out_of_office[{i}]", f'expected ["YYYY-MM-DD", "YYYY-MM-DD"], got {period!r}'
            )
        ooo.append((period[0], period[1]))
    timezone = s.text("timezone", "UTC")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise s.error("timezone", f"unknown time zone {timezone!r}") from None
    sdr = Sdr(
        id=s.text("id", "", pattern=_NAME),
        queue=s.text("queue", ""),
        name=s.text("name", ""),
        weight=s.number("weight", 1.0, positive=True),
        daily_cap=s.integer("daily_cap", 0, min=0),
        weekly_cap=s.integer("weekly_cap", 0, min=0),
        timezone=timezone,
        working_hours=(hours[0], hours[1]) if hours else ("", ""),
        working_days=tuple(days),
        out_of_office=tuple(ooo),
    )
    s.done()
    return sdr


def roster_to_data(roster: RosterSettings) -> dict[str, Any]:
    """The roster as plain data (what ``leadflow roster apply`` stores in Redis)."""
    return {
        "sdrs": [
            {
                "id": s.id,
                "queue": s.queue,
                "name": s.name,
                "weight": s.weight,
                "daily_cap": s.daily_cap,
                "weekly_cap": s.weekly_cap,
                "timezone": s.timezone,
                "working_hours": [h for h in s.working_hours if h],
                "working_days": list(s.working_days),
                "out_of_office": [list(p) for p in s.out_of_office],
            }
            for s in roster.sdrs
        ]
    }


def check_roster(roster: RosterSettings, routing: RoutingSettings, file: str) -> None:
    """Raise :class:`ConfigError` unless every SDR is unique and every queue staffed."""
    ids = [s.id for s in roster.sdrs]
    for i, sdr in enumerate(roster.sdrs):
        if sdr.id in ids[:i]:
            raise ConfigError(file, f"sdrs[{i}].id", f"SDR id {sdr.id!r} appears more than once")
        if sdr.queue not in [q.name for q in routing.queues]:
            raise ConfigError(
                file, f"sdrs[{i}].queue", f"unknown queue {sdr.queue!r} (see routing.toml)"
            )
    for q in routing.queues:
        if not roster.for_queue(q.name):
            raise ConfigError(file, "sdrs", f"queue {q.name!r} has no SDR")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}{MASK}@{netloc}"))


def masked(settings: Settings) -> dict[str, Any]:
    """Settings as plain data with every secret masked, safe to print or log."""

    def walk(obj: Any, path: str) -> Any:  # noqa: PLR0911  # one return per kind of value
        if is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: walk(getattr(obj, f.name), f"{path}.{f.name}") for f in fields(obj)}
        if isinstance(obj, Mapping):
            return {
                k: MASK if _SECRET_OPTION.search(k) else walk(v, f"{path}.{k}")
                for k, v in obj.items()
            }
        if isinstance(obj, tuple):
            return [walk(v, path) for v in obj]
        if isinstance(obj, frozenset):
            return sorted(obj)
        if path == ".redis.url":
            return mask_url(obj)
        if path == ".identity.salt":
            return MASK
        return obj

    result: dict[str, Any] = walk(settings, "")
    return result
