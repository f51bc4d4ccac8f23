"""Typed settings, loaded once at start-up from TOML files plus ``LEADFLOW_*`` env.

Four files live in one configuration directory (default: ``config/`` of this
checkout, or ``$LEADFLOW_CONFIG_DIR``): ``engine.toml`` (connections, topics,
keys, limits, dataflow), ``scoring.toml`` (rules, decay, MQL threshold),
``routing.toml`` (queues) and ``roster.toml`` (SDRs). Every key is documented in
the README.

The tables are declared, not hand-validated: each is a frozen ``msgspec.Struct``
whose fields are the file's keys, with their types, defaults and ranges
(``Meta``) and their choices (``Literal``). ``msgspec.convert`` checks a file
against them and refuses unknown keys; what one field cannot say alone (a
fallback queue that must exist, a regular expression that must compile) is
checked in the table's ``__post_init__``, which also runs when code builds or
``msgspec.structs.replace``-s a table (a test's queues, a backtest's thresholds),
so those are checked too. An unknown key, a wrong type or an
out-of-range value stops start-up with a :class:`ConfigError` naming the file,
the key and what is wrong (:func:`_config_error` words msgspec's finding so).

Environment overrides (applied after the files, checked like them, and named
when wrong):

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
* ``LEADFLOW_METRICS_LISTEN`` -> ``metrics.listen``
* ``LEADFLOW_API_PORT`` / ``LEADFLOW_API_LISTEN`` -> ``api.port`` / ``api.listen``
* ``LEADFLOW_COLLECTOR_PORT`` / ``LEADFLOW_COLLECTOR_LISTEN`` -> ``collector.port`` / ``.listen``
* ``LEADFLOW_IDENTITY_SALT`` -> ``identity.salt``

Any ``LEADFLOW_*`` variable (these, and webhook secrets such as
``LEADFLOW_WEBHOOK_SECRET``) may instead name a file holding the value:
``<NAME>_FILE=/run/secrets/x`` (Docker and Kubernetes secrets), read at
start-up, trailing newline dropped (:func:`with_secret_files`).
"""

from __future__ import annotations

import copy
import math
import os
import re
import tomllib
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import msgspec.inspect as types
from msgspec import UNSET, Meta, UnsetType
from msgspec.structs import force_setattr, replace

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
MASK = "***"
# librdkafka option names that carry secrets; their values are never printed.
_SECRET_OPTION = re.compile(r"password|secret|sasl\.oauthbearer\.config|ssl\.key\.pem", re.I)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ONE_ID_LIKE = re.compile(r"[0-9a-f]{16}")
_COUNTRY = r"^[A-Za-z]{2}$"
_CLOCK = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"
_DAY = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
_DIGEST = r"^sha256:[0-9a-f]{64}$"
_CALLING_CODE = r"^[0-9]{1,3}$"
# What a value that misses one of these patterns is told (``{value}``: what it was).
_PATTERN_PROBLEMS = {
    _NAME.pattern: "{value!r} is not a valid name (letters, digits, _ . -)",
    _COUNTRY: "{value!r} is not an ISO 3166 alpha-2 code",
    _CLOCK: 'expected a time of day "HH:MM", got {value!r}',
    _DAY: 'expected a date "YYYY-MM-DD", got {value!r}',
    _DIGEST: "expected sha256:<64 hex digits>, got {value!r} (make a key and its digest with"
    " `leadflow api key` or `leadflow collect key`)",
    _CALLING_CODE: 'must be 1 to 3 digits, e.g. "1", "55", "86", got {value!r}',
}

Name = Annotated[str, Meta(pattern=_NAME.pattern)]
Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Country = Annotated[str, Meta(pattern=_COUNTRY)]
Digest = Annotated[str, Meta(pattern=_DIGEST)]
Condition = str | int | float | bool
Channel = Literal["email", "sms", "phone", "push"]
OnProcessingError = Literal["dlq", "stop"]
Clock = Literal["wall", "event"]
IdentityLookup = Literal["auto", "on", "off"]
MqlField = Literal["company_name", "company_email", "mobile", "title", "company_size"]
BantAnswer = Literal["budget", "authority", "need", "timing"]
WebhookFormat = Literal["json", "slack", "teams"]
ApiScope = Literal["read", "feedback", "read_pii"]

CHANNELS: tuple[Channel, ...] = get_args(Channel)
CLOCKS: tuple[str, ...] = get_args(Clock)
MQL_FIELDS: tuple[str, ...] = get_args(MqlField)
BANT: tuple[str, ...] = get_args(BantAnswer)
API_SCOPES: tuple[str, ...] = get_args(ApiScope)
LEAD_URL_FIELDS = ("one_id", "decision_id", "queue", "sdr")
SHIPPED_SALT = "leadflow"
# EU and EEA member states and the UK: consent must be given, never pre-ticked (GDPR, PECR).
GDPR_COUNTRIES = (
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT",
    "LV", "LT", "LU", "MT", "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI", "NO",
    "GB",
)  # fmt: skip


class ConfigError(ValueError):
    """Invalid configuration: says which file, which key and what is wrong."""

    def __init__(self, file: str, key: str, problem: str):
        super().__init__(f"{file}: {key}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem


class _Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A table of a configuration file: its keys are the fields; any other key is refused."""


def _invalid(key: str, problem: str) -> ValueError:
    """A problem a table's ``__post_init__`` finds; ``key`` is relative to that table.

    msgspec reports it with the table's path, and :func:`_config_error` joins the two.
    """
    return ValueError(f"{key}: {problem}")


def _librdkafka_value(value: str | int | float | bool) -> str:
    # librdkafka wants "true"/"false", not Python's "True"/"False".
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class KafkaSettings(_Table, frozen=True):
    """Connection to the Kafka-protocol cluster."""

    bootstrap: str = "127.0.0.1:9092"
    # Extra librdkafka options for every client (SASL, TLS, ...); kept as librdkafka's strings.
    options: dict[str, str | int | float | bool] = {}
    # Max messages per poll per partition; Bytewax's per-item cost drops ~5x
    # between batches of 1 and 100+ (shared/BYTEWAX.md).
    source_batch_size: Annotated[int, Meta(ge=1, le=100_000)] = 1000
    # librdkafka waits this long for a fetch to fill; its 500 ms default puts
    # ~190 ms on p50 latency on a lightly loaded topic.
    fetch_wait_max_ms: Annotated[int, Meta(ge=0, le=60_000)] = 10
    # An input position beyond its partition's end (the broker lost its log):
    # "earliest" reads the partition again from its start, "stop" refuses to start.
    on_input_reset: Literal["earliest", "stop"] = "earliest"

    def __post_init__(self) -> None:
        options = {name: _librdkafka_value(v) for name, v in self.options.items()}
        force_setattr(self, "options", options)


class TopicSettings(_Table, frozen=True):
    """Names of the topics the engine reads and writes."""

    events: Name = "leadflow.events"
    feedback: Name = "leadflow.feedback"
    decisions: Name = "leadflow.decisions"
    lifecycle: Name = "leadflow.lifecycle"
    dlq: Name = "leadflow.dlq"
    parked_alerts: Name = "leadflow.alerts.parked"  # webhook alerts that could not be delivered
    # Partition count `leadflow topics create` uses when not told otherwise.
    partitions: Annotated[int, Meta(ge=1, le=10_000)] = 1

    def __post_init__(self) -> None:
        if len(set(self.all())) != len(self.all()):
            raise _invalid("-", "topic names must all be different")

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


class RedisSettings(_Table, frozen=True):
    """Connection to Redis and the layout of our keys."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "lf:"
    # Redis Cluster: batch scripts are grouped per hash slot and reads split per slot.
    cluster: bool = False
    # Retries with backoff before a batch gives up on Redis and the process exits
    # (Bytewax recovery then replays the batch).
    retries: Annotated[int, Meta(ge=0, le=100)] = 12

    def __post_init__(self) -> None:
        if urlsplit(self.url).scheme not in ("redis", "rediss", "unix"):
            raise _invalid(
                "url", f"must start with redis://, rediss:// or unix://, got {mask_url(self.url)!r}"
            )


class LimitSettings(_Table, frozen=True):
    """Guards on input and on per-person state size."""

    max_event_bytes: Annotated[int, Meta(ge=256, le=1_048_576)] = 32_768
    # How many recent messageIds each person remembers for de-duplication.
    dedup_window: Annotated[int, Meta(ge=1, le=10_000)] = 64
    # Output records kept per person for replay (re-emitted, never recomputed).
    outbox_size: Annotated[int, Meta(ge=1, le=1_000)] = 8
    # Events stamped further than this ahead of their ingest time are rejected.
    max_future_skew_s: Count = 86_400
    # Untrusted events one person may send per minute (broker time); the rest go to
    # the DLQ as "rate_limited", unscored. 0 = no limit.
    max_events_per_minute: Count = 120
    # A person's state expires after this many days without an event. 0 = never.
    retention_days: Annotated[int, Meta(ge=0, le=36_500)] = 730
    # The same track (name and properties) again within this many hours of event time
    # is a duplicate submission and scores nothing; later it scores again. 0 = never.
    duplicate_submission_hours: NonNegative = 24.0
    # When applying one person's events raises: "dlq" sends those events to the DLQ
    # (reason processing_error) and goes on with everyone else; "stop" stops the flow.
    on_processing_error: OnProcessingError = "dlq"


class ConsentPolicy(_Table, frozen=True):
    """The consent rules of a group of countries.

    ``opt_in`` channels may be used only with an explicit grant that was not
    pre-ticked; the other channels may be used unless denied or revoked.
    """

    name: Name
    countries: tuple[Country, ...] = ()
    opt_in: tuple[Channel, ...] = CHANNELS

    def __post_init__(self) -> None:
        force_setattr(self, "countries", tuple(c.upper() for c in self.countries))


class ConsentSettings(_Table, frozen=True, dict=True):
    """Country consent policies; a country no policy names gets the default one."""

    policies: tuple[ConsentPolicy, ...] = (
        ConsentPolicy("gdpr", GDPR_COUNTRIES, CHANNELS),
        ConsentPolicy("pipl", ("CN",), CHANNELS),
    )
    # The opt-in channels of every country no policy names.
    default_opt_in: tuple[Channel, ...] = ("sms", "push")
    # Segment consent-manager categories (context.consent.categoryPreferences, lower-cased)
    # -> the channels a true grants and a false denies. None by default: consent is never
    # guessed from a category nobody mapped.
    categories: dict[str, tuple[Channel, ...]] = {}

    def __post_init__(self) -> None:
        claimed: dict[str, str] = {}
        for i, policy in enumerate(self.policies):
            for country in policy.countries:
                if country in claimed:
                    raise _invalid(
                        f"policies[{i}].countries",
                        f"{country} is already in policy {claimed[country]!r}",
                    )
                claimed[country] = policy.name
        force_setattr(self, "categories", {k.lower(): v for k, v in self.categories.items()})

    @cached_property
    def default(self) -> ConsentPolicy:
        """The policy of a country no policy names."""
        return ConsentPolicy("default", (), self.default_opt_in)

    def policy_for(self, country: str) -> ConsentPolicy:
        """The policy of an ISO 3166 alpha-2 country ('' or unknown: the default)."""
        for policy in self.policies:
            if country in policy.countries:
                return policy
        return self.default


class DataflowSettings(_Table, frozen=True):
    """How the Bytewax dataflow runs."""

    processes: Annotated[int, Meta(ge=1, le=256)] = 1
    workers_per_process: Annotated[int, Meta(ge=1, le=64)] = 1
    # First port of the Bytewax cluster on this host (process i uses base + i).
    cluster_base_port: Annotated[int, Meta(ge=1024, le=65000)] = 2101
    # Directory of Bytewax recovery partitions; empty = recovery off.
    recovery_dir: str = "var/recovery"
    snapshot_interval_s: Positive = 10.0
    # Stop at the end of the input instead of waiting for more (replays, tests).
    stop_at_end: bool = False
    # "wall": records are stamped and SDRs picked by the clock (live). "event": by each
    # event's own time (a replay of history; needs stop_at_end: no timer fires).
    clock: Clock = "wall"
    # Known people's events skip the one resolver (dataflows.stages.IdentityLookup):
    # "auto" = when the flow has more than one worker, "on", "off".
    identity_lookup: IdentityLookup = "auto"
    # Decoded person states each worker keeps between batches (engine.state_cache), 3-6 KB
    # each with their stored bytes; 0 = none, every batch decodes what it loads.
    state_cache_size: Annotated[int, Meta(ge=0, le=10_000_000)] = 20_000
    # Identifier owners the resolver keeps between batches (engine.owner_cache), about
    # 170 B each; 0 = none, every batch reads its identifiers' owners from Redis.
    owner_cache_size: Annotated[int, Meta(ge=0, le=100_000_000)] = 200_000

    def looks_up_identity(self, workers: int) -> bool:
        """Whether a flow of ``workers`` workers finds known people on every worker.

        On one worker there is nothing to spread, and keeping every event on the
        resolver's path keeps one partition's run reproducible to the SDR: a
        known person's event overtaking an earlier new person's changes whose
        promotion the round robin sees first (as interleaved partitions do).
        """
        return self.identity_lookup == "on" or (self.identity_lookup == "auto" and workers > 1)


class MetricsSettings(_Table, frozen=True):
    """Where Prometheus scrapes the engine."""

    # Process i of a local cluster serves /metrics on port + i; 0 turns it off.
    port: Port = 3030
    # Process i serves /livez and /readyz on health_port + i; 0 turns them off.
    health_port: Port = 8086
    # ``leadflow alerts`` serves its own /metrics here; 0 turns it off.
    alerts_port: Port = 3099
    # The address /metrics and the health probes listen on: every interface for a
    # service Prometheus and Kubernetes reach from outside; demo and up use loopback.
    listen: str = "0.0.0.0"


class IdentifierKind(_Table, frozen=True):
    """A kind of identifier: where to find it, how strong it is, how many one person may hold."""

    name: str
    priority: Annotated[int, Meta(ge=1, le=100)]  # lower is stronger
    limit: Annotated[int, Meta(ge=1, le=1000)]  # values of this kind one person may hold
    # Dotted paths in the event for kinds declared in config (built-in kinds have their own).
    paths: tuple[str, ...] = ()


BUILTIN_KINDS = (
    IdentifierKind("user", 1, 1),
    IdentifierKind("email", 2, 1),
    IdentifierKind("phone", 3, 1),
    IdentifierKind("anon", 5, 5),
)


class DeclaredKind(_Table, frozen=True):
    """``[identity.kinds.<name>]``: a new kind, or a built-in kind's priority or limit."""

    priority: Annotated[int, Meta(ge=1, le=100)] | UnsetType = UNSET  # a new kind: 4
    limit: Annotated[int, Meta(ge=1, le=1000)] | UnsetType = UNSET  # a new kind: 1
    paths: tuple[str, ...] = ()  # where a new kind is read from (traits., context., properties.)


class IdentitySettings(_Table, frozen=True, dict=True):
    """How identifiers are read, normalised and joined into One-IDs."""

    # Keyed into every identifier and One-ID digest, so identifiers cannot be
    # recovered from Redis keys by hashing guessed e-mails.
    salt: Annotated[str, Meta(min_length=1)] = SHIPPED_SALT
    # The kinds the configuration adds or changes (the key ``kinds``); see ``kinds``.
    declared_kinds: dict[str, DeclaredKind] = msgspec.field(default_factory=dict, name="kinds")
    # Mailbox domains where dots in the local part do not matter (Gmail-style).
    fold_dots_domains: tuple[str, ...] = ("gmail.com", "googlemail.com")
    # Drop "+tag" from local parts (ana+news@x == ana@x).
    fold_plus: bool = True
    # Country calling code for phone numbers written without one (E.164).
    default_calling_code: Annotated[str, Meta(pattern=_CALLING_CODE)] = "1"
    # An erased person's identifiers refuse events older than the erasure for this long.
    erasure_block_days: Annotated[int, Meta(ge=1)] = 30

    def __post_init__(self) -> None:
        force_setattr(self, "fold_dots_domains", tuple(d.lower() for d in self.fold_dots_domains))
        _ = self.kinds  # a declared kind's mistake stops start-up, not the first event

    @cached_property
    def kinds(self) -> tuple[IdentifierKind, ...]:
        """The built-in kinds with the declared ones, strongest first."""
        kinds = {k.name: k for k in BUILTIN_KINDS}
        for name, declared in sorted(self.declared_kinds.items()):
            if not _NAME.match(name):
                raise _invalid(f"kinds.{name}", f"{name!r} is not a valid identifier kind name")
            if _ONE_ID_LIKE.fullmatch(name):
                # The identity keys tell a kind from a One-ID by this shape (engine.store).
                raise _invalid(
                    f"kinds.{name}",
                    f"{name!r}: a kind may not be named like a One-ID (16 hex digits)",
                )
            base = kinds.get(name)
            if base is None and not declared.paths:
                raise _invalid(
                    f"kinds.{name}.paths",
                    f"a new kind {name!r} needs the event paths it is read from",
                )
            if base is not None and declared.paths:
                raise _invalid(
                    f"kinds.{name}.paths", f"built-in kind {name!r} is read from its fixed places"
                )
            for path in declared.paths:
                if not path.startswith(("traits.", "context.", "properties.")):
                    raise _invalid(
                        f"kinds.{name}.paths",
                        f"{path!r} must start with traits., context. or properties.",
                    )
            priority, limit = (base.priority, base.limit) if base else (4, 1)
            kinds[name] = IdentifierKind(
                name,
                priority if declared.priority is UNSET else declared.priority,
                limit if declared.limit is UNSET else declared.limit,
                declared.paths,
            )
        return tuple(sorted(kinds.values(), key=lambda k: (k.priority, k.name)))


class ScoringRule(_Table, frozen=True, dict=True):
    """Points awarded to a person for one kind of event."""

    name: Name
    type: Literal["track", "page"]
    points: float
    # track: exact event name; page: glob over the URL path ('' = any).
    event: str = ""
    path: str = ""
    # Conditions on the event: dotted path -> the allowed value, or a list of them (any).
    where: dict[str, Condition | list[Condition]] = {}
    # At most `cap` awards per `cap_period_days` (0 days = ever): the earliest
    # events of each period by event time count, whatever order they arrive in.
    cap: Count = 0
    cap_period_days: NonNegative = 1.0
    # Named score dimensions (product lines, interests) this rule also feeds.
    dimensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.type == "track" and not self.event:
            raise _invalid("event", "a track rule needs the event name it scores")
        if self.type == "page" and self.event:
            raise _invalid("event", "page rules match on 'path', not 'event'")
        if self.points == 0:
            raise _invalid("points", "must not be 0")
        for path in self.where:
            if not path.startswith(("properties.", "traits.", "context.")):
                raise _invalid(f"where.{path}", "must start with properties., traits. or context.")

    @cached_property
    def conditions(self) -> tuple[tuple[str, tuple[Condition, ...]], ...]:
        """``where`` as (dotted path, allowed values) pairs."""
        return tuple(
            (path, tuple(value) if isinstance(value, list) else (value,))
            for path, value in self.where.items()
        )


class Dimension(_Table, frozen=True):
    """A named behaviour score with its own decay and threshold (e.g. a product line)."""

    half_life_days: Positive = 30.0
    mql_threshold: Positive = 100.0


class ScoringSettings(_Table, frozen=True):
    """The behaviour score and the MQL threshold."""

    half_life_days: Positive = 30.0
    mql_threshold: Positive = 100.0
    rules: tuple[ScoringRule, ...] = ()
    # Name -> its decay and threshold.
    dimensions: dict[str, Dimension] = {}
    # How many contributions a decision cites as its reasons.
    reasons: Annotated[int, Meta(ge=1, le=20)] = 3
    # "No interaction for `inactivity_period_days` costs `inactivity_points`",
    # once per whole period since the last event (0 = off). A cost: a positive number.
    inactivity_points: NonNegative = 0.0
    inactivity_period_days: Positive = 30.0

    def __post_init__(self) -> None:
        for name in self.dimensions:
            if not _NAME.match(name):
                raise _invalid(f"dimensions.{name}", f"{name!r} is not a valid dimension name")
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise _invalid("rules", f"rule name {dupes[0]!r} is used more than once")
        for i, rule in enumerate(self.rules):
            for d in rule.dimensions:
                if d not in self.dimensions:
                    raise _invalid(
                        f"rules[{i}].dimensions",
                        f"unknown dimension {d!r}; declare [scoring.dimensions.{d}]",
                    )


def _check_patterns(patterns: tuple[str, ...], key: str) -> None:
    for i, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as e:
            raise _invalid(f"{key}[{i}]", f"invalid regular expression {pattern!r}: {e}") from None


class SeniorityLevel(_Table, frozen=True):
    """Job titles matching any pattern (case-insensitive regex) earn ``points``."""

    name: Name
    points: float
    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_patterns(self.patterns, "patterns")


class SizeBand(_Table, frozen=True):
    """Companies with ``min``..``max`` employees (inclusive) earn ``points``."""

    min: Count = 0
    max: Count = 10**9
    points: float = 0.0

    def __post_init__(self) -> None:
        if self.max < self.min:
            raise _invalid("max", f"must be >= min ({self.min})")


class FitSettings(_Table, frozen=True):
    """Profile fit: points per trait of the person and their company."""

    company_email_points: float = 0.0
    seniority: tuple[SeniorityLevel, ...] = ()
    company_size: tuple[SizeBand, ...] = ()
    # Country (ISO 3166 alpha-2, upper case) -> points; "*" for any other.
    countries: dict[str, float] = {}
    # Industry (lower case) -> points; "*" for any other.
    industries: dict[str, float] = {}
    # Points per MQL field present (company_name, company_email, mobile, title, company_size).
    completeness: dict[str, float] = {}
    # Points per BANT answer given (budget, authority, need, timing).
    bant: dict[str, float] = {}

    def __post_init__(self) -> None:
        for key, allowed in (("completeness", MQL_FIELDS), ("bant", BANT)):
            for name in getattr(self, key):
                if name not in allowed:
                    raise _invalid(
                        f"{key}.{name}", f"unknown; expected one of {', '.join(allowed)}"
                    )
        force_setattr(self, "countries", {k.upper(): v for k, v in self.countries.items()})
        force_setattr(self, "industries", {k.lower(): v for k, v in self.industries.items()})


def _bands(bands: dict[str, float], key: str) -> dict[str, float]:
    """``bands`` best first, refused unless the lowest is a floor (0) and names are short."""
    ordered = dict(sorted(bands.items(), key=lambda band: -band[1]))
    if not ordered or list(ordered.values())[-1] != 0:
        raise _invalid(key, "the lowest band needs a minimum of 0, so every lead has a band")
    if any(not name or len(name) > 3 for name in ordered):
        raise _invalid(key, "band names are short: a letter or a digit, e.g. A or 1")
    return ordered


class GradeSettings(_Table, frozen=True):
    """The lead grade: a fit band (a letter) and an engagement band (a digit), e.g. "A1".

    Each band is ``name = minimum``, kept best first: a lead takes the first band whose
    minimum its score reaches (the last band's minimum is 0: everyone has one).
    """

    fit_bands: dict[str, float] = msgspec.field(
        default_factory=lambda: {"A": 70.0, "B": 45.0, "C": 25.0, "D": 0.0}
    )
    engagement_bands: dict[str, float] = msgspec.field(
        default_factory=lambda: {"1": 150.0, "2": 100.0, "3": 50.0, "4": 0.0}
    )

    def __post_init__(self) -> None:
        force_setattr(self, "fit_bands", _bands(self.fit_bands, "fit_bands"))
        force_setattr(self, "engagement_bands", _bands(self.engagement_bands, "engagement_bands"))


class CleansingSettings(_Table, frozen=True):
    """What disqualifies a lead before anything counts."""

    test_email_patterns: tuple[str, ...] = ()
    test_name_patterns: tuple[str, ...] = ()
    internal_domains: tuple[str, ...] = ()
    competitor_domains: tuple[str, ...] = ()
    # Files of domains, one per line ('#' comments), relative to the configuration
    # directory; read at start-up into the sets below (which may also be given inline).
    disposable_domains_file: str = ""
    free_mail_domains_file: str = ""
    disposable_domains: frozenset[str] = frozenset()
    free_mail_domains: frozenset[str] = frozenset()
    # Regexes over a phone's national digits that mark it as made up.
    fake_phone_patterns: tuple[str, ...] = ()
    # A whole number of at least this many digits in one ascending or descending run is fake.
    consecutive_phone_digits: Annotated[int, Meta(ge=3, le=20)] = 6

    def __post_init__(self) -> None:
        for key in ("internal_domains", "competitor_domains"):
            force_setattr(self, key, tuple(d.lower() for d in getattr(self, key)))
        for key in ("disposable_domains", "free_mail_domains"):
            force_setattr(self, key, frozenset(d.lower() for d in getattr(self, key)))
        for key in ("test_email_patterns", "test_name_patterns", "fake_phone_patterns"):
            _check_patterns(getattr(self, key), key)


class QualificationSettings(_Table, frozen=True):
    """The MQL rule besides the behaviour threshold."""

    min_fit: float = 0.0
    required_fields: tuple[MqlField, ...] = ()


def _check_web_address(url: str, key: str) -> None:
    if url and not url.startswith(("http://", "https://")):
        raise _invalid(key, "must start with http:// or https://")


class QueueSettings(_Table, frozen=True):
    """One routing queue."""

    name: Name
    sla_minutes: Positive = 30.0  # an MQL not accepted by then goes to the next SDR
    # With nobody available, wait at most this long, then go to ``fallback_queue`` (0: wait).
    max_wait_minutes: NonNegative = 0.0
    fallback_queue: str = ""
    sticky: bool = True  # a company (e-mail domain) keeps the SDR who had its first lead
    webhook_url: str = ""  # decisions of this queue are also POSTed here ('' = none)
    # Environment variable holding the HMAC-SHA256 key that signs the webhook's bodies
    # ("new,old" during a rotation: both sign). Required unless webhook_unsigned.
    webhook_secret_env: str = "LEADFLOW_WEBHOOK_SECRET"
    webhook_unsigned: bool = False  # explicitly send this queue's alerts unsigned
    # What the webhook receives: the decision's JSON, a Slack message (Block Kit, for an
    # incoming webhook) or a Microsoft Teams message (an Adaptive Card, same).
    webhook_format: WebhookFormat = "json"
    # The lead in your CRM, linked from the alert: a URL with placeholders among
    # LEAD_URL_FIELDS, e.g. "https://crm.example.com/leads?leadflow={one_id}" ('' = no link).
    lead_url: str = ""

    def __post_init__(self) -> None:
        _check_web_address(self.webhook_url, "webhook_url")
        _check_web_address(self.lead_url, "lead_url")
        for name in re.findall(r"{([^{}]*)}", self.lead_url):
            if name not in LEAD_URL_FIELDS:
                fields = ", ".join(LEAD_URL_FIELDS)
                raise _invalid(
                    "lead_url", f"unknown placeholder {{{name}}}; expected some of {fields}"
                )


class AlertSettings(_Table, frozen=True):
    """How ``leadflow alerts`` delivers decisions to webhooks."""

    retry_first_s: Positive = 1.0  # the first wait after a failed POST; doubles each try
    retry_max_s: Positive = 60.0  # the longest single wait (each wait is jittered: 50-100 %)
    give_up_after_s: NonNegative = 900.0  # still failing this long after the first try: parked
    timeout_s: Positive = 5.0  # per phase of a POST (connect, write, read, pool)
    remember_days: Positive = 30.0  # a delivered decision id is remembered this long (no re-send)

    def __post_init__(self) -> None:
        if self.retry_max_s < self.retry_first_s:
            raise _invalid("retry_max_s", f"must be >= retry_first_s ({self.retry_first_s})")


def _check_unique_digests(digests: list[str]) -> None:
    if len(set(digests)) != len(digests):
        raise _invalid("keys", "two keys have the same digest")


class ApiKey(_Table, frozen=True):
    """A key of the HTTP API: only its digest is configured, never the key itself."""

    name: Name  # who holds it; the actor of the feedback it posts
    digest: Digest  # "sha256:<hex>" of the key (``leadflow api key`` makes both)
    scopes: frozenset[ApiScope] = frozenset()


class ApiSettings(_Table, frozen=True):
    """``leadflow api``: feedback and look-ups over HTTP."""

    port: Port = 8088  # 0: off
    listen: str = "0.0.0.0"
    keys: tuple[ApiKey, ...] = ()

    def __post_init__(self) -> None:
        _check_unique_digests([k.digest for k in self.keys])


class WriteKey(_Table, frozen=True):
    """A source's write key for ``leadflow collect``: configured as a digest only."""

    name: Name  # the source ("website", "crm-sync"); stamped on its events
    digest: Digest  # "sha256:<hex>" of the key (``leadflow collect key`` makes both)
    topic: Literal["events", "feedback"] = "events"  # untrusted browsers / trusted servers
    # Events per second the key may send (a token bucket of one second's worth): 429 beyond.
    rate_per_s: Positive = 1000.0
    # A key writing to the feedback topic must say so: a server-side source only.
    trusted: bool = False

    def __post_init__(self) -> None:
        if self.topic == "feedback" and not self.trusted:
            raise _invalid(
                "trusted",
                "a key writing to the feedback topic must say trusted = true (a server-side"
                " source: never give it to a browser)",
            )


class CollectorSettings(_Table, frozen=True):
    """``leadflow collect``: Segment's HTTP Tracking API."""

    port: Port = 8080  # 0: off
    listen: str = "0.0.0.0"
    keys: tuple[WriteKey, ...] = ()
    # Record the client's address as context.ip when the event has none (Segment does).
    record_ip: bool = True
    # Browser origins allowed to post (CORS); ["*"] for any site.
    cors_origins: tuple[str, ...] = ("*",)
    # A batch body, after gunzip (an event: limits.max_event_bytes).
    max_batch_bytes: Annotated[int, Meta(ge=1024)] = 512_000
    # Trust X-Forwarded-For from a proxy in front (its first address is the client's).
    trust_forwarded_for: bool = False

    def __post_init__(self) -> None:
        _check_unique_digests([k.digest for k in self.keys])


class RoutingRule(_Table, frozen=True):
    """Leads matching every non-empty condition go to ``queue``; the first rule matching wins."""

    name: Name
    queue: str
    countries: frozenset[str] = frozenset()  # ISO alpha-2, upper case
    regions: tuple[str, ...] = ()  # names from [routing.regions]
    min_company_size: Count = 0
    max_company_size: Count = 0  # 0: no upper bound
    industries: frozenset[str] = frozenset()  # lower case
    dimensions: frozenset[str] = frozenset()  # product lines the person qualified on
    campaigns: frozenset[str] = frozenset()  # campaign names of the first or latest touch

    def __post_init__(self) -> None:
        force_setattr(self, "countries", frozenset(c.upper() for c in self.countries))
        force_setattr(self, "industries", frozenset(i.lower() for i in self.industries))


class RoutingSettings(_Table, frozen=True):
    """Queues MQLs are routed to."""

    default_queue: str = ""  # '' = the first queue
    queues: Annotated[tuple[QueueSettings, ...], Meta(min_length=1)] = (QueueSettings("inbound"),)
    rules: tuple[RoutingRule, ...] = ()
    regions: dict[str, frozenset[str]] = {}  # name -> countries

    def __post_init__(self) -> None:
        names = [q.name for q in self.queues]
        if len(set(names)) != len(names):
            raise _invalid("queues", "queue names must be unique")
        for i, queue in enumerate(self.queues):
            if queue.fallback_queue and queue.fallback_queue not in names:
                raise _invalid(
                    f"queues[{i}].fallback_queue", f"unknown queue {queue.fallback_queue!r}"
                )
        force_setattr(self, "default_queue", self.default_queue or names[0])
        if self.default_queue not in names:
            raise _invalid(
                "default_queue", f"{self.default_queue!r} is not one of the queues {names}"
            )
        regions = {name: frozenset(c.upper() for c in cs) for name, cs in self.regions.items()}
        force_setattr(self, "regions", regions)
        for i, rule in enumerate(self.rules):
            if rule.queue not in names:
                raise _invalid(
                    f"rules[{i}].queue", f"unknown queue {rule.queue!r}; expected one of {names}"
                )
            for region in rule.regions:
                if region not in regions:
                    raise _invalid(
                        f"rules[{i}].regions",
                        f"unknown region {region!r} (declare it in [routing.regions])",
                    )

    def queue(self, name: str) -> QueueSettings:
        """The queue called ``name``."""
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)


class Sdr(_Table, frozen=True):
    """A sales development rep on the roster, with their share and availability."""

    id: Name
    queue: str
    name: str = ""
    weight: Positive = 1.0  # share of the queue's leads relative to the others
    daily_cap: Count = 0  # most leads per day in the SDR's time zone (0: no cap)
    weekly_cap: Count = 0  # most leads per ISO week (0: no cap)
    timezone: str = "UTC"
    # ["09:00", "18:00"] local; none: any time (kept as ("", "")).
    working_hours: tuple[Annotated[str, Meta(pattern=_CLOCK)], ...] = ("", "")
    working_days: tuple[Annotated[int, Meta(ge=1, le=7)], ...] = (1, 2, 3, 4, 5, 6, 7)  # ISO
    # Inclusive local dates, ["2026-12-24", "2026-12-26"].
    out_of_office: tuple[tuple[Annotated[str, Meta(pattern=_DAY)], ...], ...] = ()

    def __post_init__(self) -> None:
        hours = self.working_hours or ("", "")
        if len(hours) != 2:
            raise _invalid("working_hours", f'expected ["HH:MM", "HH:MM"], got {list(hours)!r}')
        force_setattr(self, "working_hours", hours)
        for i, period in enumerate(self.out_of_office):
            if len(period) != 2 or period[0] > period[1]:
                raise _invalid(
                    f"out_of_office[{i}]",
                    f'expected ["YYYY-MM-DD", "YYYY-MM-DD"], first to last, got {list(period)!r}',
                )
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise _invalid("timezone", f"unknown time zone {self.timezone!r}") from None


class RosterSettings(_Table, frozen=True):
    """Who takes leads, per queue."""

    sdrs: tuple[Sdr, ...] = ()
    version: int = 0  # 0: from roster.toml; else the version applied to Redis

    def for_queue(self, queue: str) -> tuple[Sdr, ...]:
        """The SDRs of ``queue`` in roster order."""
        return tuple(s for s in self.sdrs if s.queue == queue)


class LifecycleSettings(_Table, frozen=True):
    """What sales feedback does to a person, and the lifecycle timers."""

    # A rejection with one of these reasons disqualifies; any other reason recycles.
    disqualify_reasons: tuple[str, ...] = ("spam", "competitor", "not_a_lead")
    # Every behaviour score is multiplied by this on recycle.
    recycle_score_factor: Annotated[float, Meta(ge=0, le=1)] = 0.5
    recycle_days: NonNegative = 30.0  # a recycled person re-enters nurture after this many days
    demote_on_decay: bool = True  # an unaccepted MQL falls back when decay takes it below
    # A promotion whose qualifying scores have decayed below their bars by the time it is
    # processed (late or backfilled events) is recorded as "late_promotion" and sent to
    # no SDR; true alerts it anyway.
    alert_late_promotions: bool = False


class Settings(_Table, frozen=True):
    """Everything the engine needs, validated."""

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    redis: RedisSettings = RedisSettings()
    limits: LimitSettings = LimitSettings()
    dataflow: DataflowSettings = DataflowSettings()
    metrics: MetricsSettings = MetricsSettings()
    identity: IdentitySettings = IdentitySettings()
    scoring: ScoringSettings = ScoringSettings()
    fit: FitSettings = FitSettings()
    grade: GradeSettings = GradeSettings()
    cleansing: CleansingSettings = CleansingSettings()
    qualification: QualificationSettings = QualificationSettings()
    routing: RoutingSettings = RoutingSettings()
    roster: RosterSettings = RosterSettings()
    lifecycle: LifecycleSettings = LifecycleSettings()
    consent: ConsentSettings = ConsentSettings()
    alerts: AlertSettings = AlertSettings()
    api: ApiSettings = ApiSettings()
    collector: CollectorSettings = CollectorSettings()
    config_dir: str = str(DEFAULT_CONFIG_DIR)


# The tables of each file (roster.toml is a RosterSettings of its own).
_FILE_TABLES = {
    "engine.toml": (
        "kafka", "topics", "redis", "limits", "dataflow", "metrics", "identity", "consent",
        "alerts", "api", "collector",
    ),
    "scoring.toml": ("scoring", "fit", "grade", "cleansing", "qualification"),
    "routing.toml": ("routing", "lifecycle"),
}  # fmt: skip
# Environment variable -> (table, key) it overrides.
_ENV_OVERRIDES = {
    "LEADFLOW_KAFKA_BOOTSTRAP": ("kafka", "bootstrap"),
    "LEADFLOW_REDIS_URL": ("redis", "url"),
    "LEADFLOW_PROCESSES": ("dataflow", "processes"),
    "LEADFLOW_RECOVERY_DIR": ("dataflow", "recovery_dir"),
    "LEADFLOW_METRICS_PORT": ("metrics", "port"),
    "LEADFLOW_HEALTH_PORT": ("metrics", "health_port"),
    "LEADFLOW_ALERTS_METRICS_PORT": ("metrics", "alerts_port"),
    "LEADFLOW_METRICS_LISTEN": ("metrics", "listen"),
    "LEADFLOW_API_PORT": ("api", "port"),
    "LEADFLOW_API_LISTEN": ("api", "listen"),
    "LEADFLOW_COLLECTOR_PORT": ("collector", "port"),
    "LEADFLOW_COLLECTOR_LISTEN": ("collector", "listen"),
    "LEADFLOW_IDENTITY_SALT": ("identity", "salt"),
}
# Text overrides an empty variable leaves alone (an empty recovery_dir is a value: off).
_EMPTY_IS_UNSET = frozenset(
    ("LEADFLOW_KAFKA_BOOTSTRAP", "LEADFLOW_REDIS_URL", "LEADFLOW_METRICS_LISTEN",
     "LEADFLOW_API_LISTEN", "LEADFLOW_COLLECTOR_LISTEN", "LEADFLOW_IDENTITY_SALT")
)  # fmt: skip
_KAFKA_OPTION = "LEADFLOW_KAFKA_OPT_"
_T = TypeVar("_T")


def read_toml(path: Path) -> dict[str, Any]:
    """The tables of the TOML file at ``path``; a missing or broken file is a ConfigError."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "-", "file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), "-", f"not valid TOML: {e}") from None


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
    tables: dict[str, Any] = {}
    for name, keys in _FILE_TABLES.items():
        file = str(directory / name)
        data = read_toml(directory / name)
        for key in data:
            if key not in keys:
                raise ConfigError(file, key, "unknown key (check the spelling; see README)")
        parsed = _convert(data, Settings, file)
        tables.update({key: getattr(parsed, key) for key in keys})
    roster_file = str(directory / "roster.toml")
    roster = _convert(read_toml(directory / "roster.toml"), RosterSettings, roster_file)
    settings = Settings(**tables, roster=roster, config_dir=str(directory))
    settings = _with_environment(settings, env)
    cleansing = _with_domain_lists(settings.cleansing, directory)
    check_roster(settings.roster, settings.routing, roster_file)
    return replace(settings, cleansing=cleansing)


def _with_domain_lists(cleansing: CleansingSettings, directory: Path) -> CleansingSettings:
    """``cleansing`` with the domains of its ``*_domains_file`` files added to its sets."""
    lists: dict[str, frozenset[str]] = {}
    for key in ("disposable_domains", "free_mail_domains"):
        name = getattr(cleansing, f"{key}_file")
        if not name:
            continue
        path = directory / name
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            file = str(directory / "scoring.toml")
            raise ConfigError(
                file, f"cleansing.{key}_file", f"cannot read {path}: {e.strerror}"
            ) from None
        domains = {d.strip().lower() for d in lines if d.strip() and not d.lstrip().startswith("#")}
        lists[key] = getattr(cleansing, key) | domains
    return replace(cleansing, **lists)


def _with_environment(settings: Settings, env: Mapping[str, str]) -> Settings:
    """``settings`` with the ``LEADFLOW_*`` overrides in ``env``, checked like the files."""
    tables: dict[str, Any] = {}
    for variable, (name, key) in _ENV_OVERRIDES.items():
        raw = env.get(variable)
        if raw is None or (not raw and variable in _EMPTY_IS_UNSET):
            continue
        table = tables.get(name, getattr(settings, name))
        data = msgspec.to_builtins(table) | {key: raw}
        try:
            tables[name] = msgspec.convert(data, type(table), strict=False)
        except msgspec.ValidationError as e:
            # The variable is what to fix, not the file.
            problem = _config_error(e, data, type(table), "env").problem
            raise ConfigError("env", variable, problem) from None
    options = {
        name.removeprefix(_KAFKA_OPTION).lower().replace("_", "."): value
        for name, value in env.items()
        if name.startswith(_KAFKA_OPTION)
    }
    if options:
        kafka = tables.get("kafka", settings.kafka)
        tables["kafka"] = replace(kafka, options={**kafka.options, **options})
    return replace(settings, **tables)


def _convert(data: dict[str, Any], cls: type[_T], file: str) -> _T:
    """``data`` (a file's tables) checked against ``cls``; a problem names file and key."""
    _check_finite(data, file, "")
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as e:
        raise _config_error(e, data, cls, file) from None


def _check_finite(value: Any, file: str, key: str) -> None:
    """TOML allows inf and nan, which no setting means."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(file, key, f"must be finite, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, file, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, file, f"{key}[{i}]")


_PATH_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_NOUNS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "a table",
}
_MISSING = object()  # a key the data does not have


def _config_error(  # noqa: PLR0911  # one return per kind of finding
    e: msgspec.ValidationError, data: Any, cls: type, file: str
) -> ConfigError:
    """Word msgspec's finding as a :class:`ConfigError` naming ``file``, the key and problem.

    msgspec says ``Expected `int` >= 1 - at `$.limits.dedup_window```; the user reads
    ``limits.dedup_window: must be between 1 and 10000, got 0``, worded from the
    declared type at that key and the value the file gave.
    """
    message, _, where = str(e).partition(" - at `")
    bad_key = where.startswith("key` in `")
    steps = [
        name if name else f"[{index}]"
        for name, index in _PATH_STEP.findall(where.removeprefix("key` in `").rstrip("`"))
    ]
    steps = _name_entries(steps, data, cls, message)
    value, kind = _at(steps, data, types.type_info(cls))
    key = _key(steps)

    def at(sub: str) -> str:
        return f"{key}.{sub}" if key else sub

    if m := re.fullmatch(r"Object contains unknown field `(.+)`", message):
        return ConfigError(file, at(m[1]), "unknown key (check the spelling; see README)")
    if m := re.fullmatch(r"Object missing required field `(.+)`", message):
        return ConfigError(file, at(m[1]), "is required")
    if m := re.fullmatch(r"Invalid enum value (.+)", message):
        choices = ", ".join(getattr(_key_type(kind) if bad_key else kind, "values", ()))
        if bad_key:
            return ConfigError(file, at(m[1].strip("'")), f"unknown key; expected one of {choices}")
        return ConfigError(file, key, f"{value!r} is not one of {choices}")
    if m := re.fullmatch(r"Expected `([^`]+)`, got `([^`]+)`", message):
        noun = _NOUNS.get(m[1], f"`{m[1]}`")
        return ConfigError(file, key, f"expected {noun}, got {type(value).__name__} {value!r}")
    if message.startswith("Expected `"):
        return ConfigError(file, key, _out_of_bounds(kind, value))
    # A __post_init__'s ValueError: "<key within the table>: <problem>".
    if m := re.fullmatch(r"([^\s:]+): (.+)", message, re.S):
        return ConfigError(file, key if m[1] == "-" and key else at(m[1]), m[2])
    return ConfigError(file, key or "-", message)


def _key(steps: list[str]) -> str:
    return "".join(s if s.startswith("[") else f".{s}" for s in steps).lstrip(".")


def _name_entries(steps: list[str], data: Any, cls: type, message: str) -> list[str]:
    """``steps`` with each ``[...]`` (msgspec's word for a table's entry) named.

    The entry named is the first whose value, alone in its table, fails as the whole did.
    """
    steps = list(steps)
    for i, step in enumerate(steps):
        table, _ = _at(steps[:i], data, None)
        if step != "[...]" or not isinstance(table, dict):
            continue
        for name, entry in table.items():
            trial = copy.deepcopy(data)
            alone, _ = _at(steps[:i], trial, None)
            alone.clear()
            alone[name] = entry
            try:
                msgspec.convert(trial, cls)
            except msgspec.ValidationError as e:
                if str(e).partition(" - at `")[0] == message:
                    steps[i] = name
                    break
    return steps


def _at(steps: list[str], data: Any, kind: Any) -> tuple[Any, Any]:
    """The value at ``steps`` in ``data`` and its declared type (``kind``, msgspec.inspect)."""
    value = data
    for step in steps:
        index = step[1:-1] if step.startswith("[") else None
        kind = _inner(kind, step, index)
        if index is not None and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        elif isinstance(value, dict) and step in value:
            value = value[step]
        else:
            value = _MISSING
    return value, kind


def _inner(kind: Any, step: str, index: str | None) -> Any:
    """The declared type one step into ``kind``."""
    if isinstance(kind, types.StructType):
        return next((f.type for f in kind.fields if f.encode_name == step), None)
    if isinstance(kind, types.DictType):
        return kind.value_type
    if isinstance(kind, types.TupleType) and index is not None:
        return kind.item_types[int(index)]
    return getattr(kind, "item_type", None)


def _key_type(kind: Any) -> Any:
    return kind.key_type if isinstance(kind, types.DictType) else kind


def _number(x: float) -> str:
    return f"{x:g}"


def _out_of_bounds(kind: Any, value: Any) -> str:
    """What is wrong with ``value``, which has the right type but not the declared bounds."""
    if isinstance(kind, types.StrType):
        if kind.pattern:
            text = _PATTERN_PROBLEMS.get(kind.pattern, "{value!r} does not match " + kind.pattern)
            return text.format(value=value)
        return "must not be empty"
    if isinstance(kind, types.IntType | types.FloatType):
        if kind.ge is not None and kind.le is not None:
            return f"must be between {_number(kind.ge)} and {_number(kind.le)}, got {value}"
        bounds = [
            f"{op} {_number(b)}" for op, b in ((">=", kind.ge), (">", kind.gt)) if b is not None
        ]
        bounds += [
            f"{op} {_number(b)}" for op, b in (("<=", kind.le), ("<", kind.lt)) if b is not None
        ]
        return f"must be {' and '.join(bounds)}, got {value}"
    if getattr(kind, "min_length", None):
        return f"needs at least {kind.min_length} (see README)"
    return f"{value!r} is out of bounds"


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


def roster_data(data: Mapping[str, Any], source: str, version: int = 0) -> RosterSettings:
    """A roster from plain data (as stored in Redis), validated like roster.toml."""
    roster = _convert(dict(data), RosterSettings, source)
    return replace(roster, version=version)


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

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: MASK if _SECRET_OPTION.search(k) else walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    shown: dict[str, Any] = walk(msgspec.to_builtins(settings, order="sorted"))
    shown["redis"]["url"] = mask_url(settings.redis.url)
    shown["identity"]["salt"] = MASK
    return shown
