from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from msgspec.structs import replace

from engine.settings import (
    DEFAULT_CONFIG_DIR,
    ConfigError,
    check_private_salt,
    load_settings,
    mask_url,
    masked,
    with_secret_files,
)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    for f in DEFAULT_CONFIG_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_default_configuration_is_valid() -> None:
    s = load_settings(env={})
    assert s.scoring.mql_threshold == 100.0
    assert len(s.roster.for_queue(s.routing.default_queue)) == 3


def test_environment_overrides_connections_and_librdkafka_options() -> None:
    s = load_settings(
        env={
            "LEADFLOW_KAFKA_BOOTSTRAP": "k1:9092,k2:9092",
            "LEADFLOW_REDIS_URL": "rediss://r:6380/1",
            "LEADFLOW_KAFKA_OPT_SASL_MECHANISM": "SCRAM-SHA-512",
            "LEADFLOW_PROCESSES": "4",
        }
    )
    assert s.kafka.bootstrap == "k1:9092,k2:9092"
    assert s.redis.url == "rediss://r:6380/1"
    assert s.kafka.options["sasl.mechanism"] == "SCRAM-SHA-512"
    assert s.dataflow.processes == 4


@pytest.mark.parametrize(
    ("file", "old", "new", "key", "problem"),
    [
        (
            "engine.toml",
            'identity_lookup = "auto"',
            'identity_lookup = "sometimes"',
            "dataflow.identity_lookup",
            "'sometimes' is not one of auto, off, on",
        ),
        (
            "scoring.toml",
            "half_life_days = 30.0",
            "half_life_days = 0",
            "scoring.half_life_days",
            "must be > 0",
        ),
        (
            "scoring.toml",
            "mql_threshold = 100.0",
            "mql_treshold = 100.0",
            "scoring.mql_treshold",
            "unknown key",
        ),
        (
            "scoring.toml",
            'type = "track"',
            'type = "click"',
            "scoring.rules[6].type",
            "'click' is not one of page, track",
        ),
        (
            "scoring.toml",
            "points = 15",
            'points = "15"',
            "scoring.rules[6].points",
            "expected a number, got str '15'",
        ),
        (
            "engine.toml",
            "dedup_window = 64",
            "dedup_window = 0",
            "limits.dedup_window",
            "must be between 1 and 10000, got 0",
        ),
        (
            "engine.toml",
            'url = "redis://',
            'url = "http://',
            "redis.url",
            "must start with redis://",
        ),
        (
            "routing.toml",
            'default_queue = "inbound"',
            'default_queue = "vip"',
            "routing.default_queue",
            "not one of",
        ),
        (
            "roster.toml",
            'queue = "inbound"\n\n[[sdrs]]\nid = "sdr-bruno"',
            'queue = "outbound"\n\n[[sdrs]]\nid = "sdr-bruno"',
            "sdrs[0].queue",
            "unknown queue 'outbound'",
        ),
        (
            "roster.toml",
            'id = "sdr-chen"',
            'id = "sdr-ana"',
            "sdrs[2].id",
            "appears more than once",
        ),
        (
            "roster.toml",
            'name = "Chen Wei"',
            'name = "Chen Wei"\ntimezone = "Mars/Olympus"',
            "sdrs[2].timezone",
            "unknown time zone",
        ),
        (
            "roster.toml",
            'name = "Chen Wei"',
            'name = "Chen Wei"\nworking_hours = ["9am", "6pm"]',
            "sdrs[2].working_hours[0]",
            "expected a time of day \"HH:MM\", got '9am'",
        ),
        (
            "roster.toml",
            'name = "Chen Wei"',
            'name = "Chen Wei"\nout_of_office = [["2026-12-31", "2026-12-24"]]',
            "sdrs[2].out_of_office[0]",
            "YYYY-MM-DD",
        ),
        (
            "routing.toml",
            '# [[routing.rules]]\n# name = "enterprise-latam"\n# queue = "inbound"\n'
            '# regions = ["latam"]',
            '[[routing.rules]]\nname = "enterprise-latam"\nqueue = "inbound"\nregions = ["apac"]',
            "routing.rules[0].regions",
            "unknown region 'apac'",
        ),
        (
            "routing.toml",
            'fallback_queue = ""',
            'fallback_queue = "vip"',
            "routing.queues[0].fallback_queue",
            "unknown queue 'vip'",
        ),
        (
            "routing.toml",
            "recycle_score_factor = 0.5",
            "recycle_score_factor = 2",
            "lifecycle.recycle_score_factor",
            "between 0 and 1",
        ),
        (
            "engine.toml",
            'countries = ["CN"]',
            'countries = ["CN", "DE"]',
            "consent.policies[1].countries",
            "DE is already in policy 'gdpr'",
        ),
        (
            "engine.toml",
            'default_opt_in = ["sms", "push"]',
            'default_opt_in = ["sms", "fax"]',
            "consent.default_opt_in[1]",
            "'fax' is not one of email, phone, push, sms",
        ),
        (
            "engine.toml",
            'countries = ["CN"]',
            'countries = ["China"]',
            "consent.policies[1].countries[0]",
            "'China' is not an ISO 3166 alpha-2 code",
        ),
        (
            "routing.toml",
            'webhook_format = "json"',
            'webhook_format = "discord"',
            "routing.queues[0].webhook_format",
            "'discord' is not one of json, slack, teams",
        ),
        (
            "routing.toml",
            'lead_url = ""',
            'lead_url = "https://crm.example.com/{email}"',
            "routing.queues[0].lead_url",
            "unknown placeholder {email}",
        ),
        (
            "engine.toml",
            "retry_max_s = 60.0",
            "retry_max_s = 0.5",
            "alerts.retry_max_s",
            "must be >= retry_first_s",
        ),
        (
            "engine.toml",
            '# [[api.keys]]\n# name = "crm-sync"\n# digest = "sha256:..."\n'
            '# scopes = ["read", "feedback"]',
            '[[api.keys]]\nname = "crm"\ndigest = "sha256:abc"\nscopes = ["read"]',
            "api.keys[0].digest",
            "expected sha256:<64 hex digits>",
        ),
        (
            "engine.toml",
            '# [[api.keys]]\n# name = "crm-sync"\n# digest = "sha256:..."\n'
            '# scopes = ["read", "feedback"]',
            f'[[api.keys]]\nname = "crm"\ndigest = "sha256:{"0" * 64}"\nscopes = ["write"]',
            "api.keys[0].scopes[0]",
            "'write' is not one of feedback, read, read_pii",
        ),
        # A table's entries are named, though msgspec says only "[...]".
        (
            "scoring.toml",
            "half_life_days = 21.0",
            "half_life_days = -1",
            "scoring.dimensions.analytics.half_life_days",
            "must be > 0, got -1",
        ),
        ("scoring.toml", "US = 5", 'US = "five"', "fit.countries.US", "expected a number"),
        ("scoring.toml", "budget = 5", "money = 5", "fit.bant.money", "unknown; expected one"),
        (
            "routing.toml",
            "[routing.regions]",
            "[[routing.queues]]\nsla_minutes = 5\n\n[routing.regions]",
            "routing.queues[0].name",
            "is required",
        ),
        ("engine.toml", "dedup_window = 64", "dedup_window = inf", "limits.dedup_window", "finite"),
        ("engine.toml", "[limits]", "[limitz]", "limitz", "unknown key"),
    ],
)
def test_invalid_configuration_names_file_key_and_problem(
    config: Path, file: str, old: str, new: str, key: str, problem: str
) -> None:
    edit(config / file, old, new)
    with pytest.raises(ConfigError) as e:
        load_settings(config, env={})
    assert e.value.file == str(config / file)
    assert e.value.key == key
    assert problem in e.value.problem


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("LEADFLOW_PROCESSES", "many", "expected an integer, got str 'many'"),
        ("LEADFLOW_PROCESSES", "0", "must be between 1 and 256, got 0"),
        ("LEADFLOW_METRICS_PORT", "70000", "must be between 0 and 65535, got 70000"),
        ("LEADFLOW_REDIS_URL", "http://h:1", "must start with redis://"),
    ],
)
def test_a_wrong_environment_override_names_the_variable(
    variable: str, value: str, problem: str
) -> None:
    """The variable is what to fix, not the file it overrides."""
    with pytest.raises(ConfigError) as e:
        load_settings(env={variable: value})
    assert (e.value.file, e.value.key) == ("env", variable)
    assert problem in e.value.problem


def test_an_empty_text_override_is_unset_but_an_empty_recovery_dir_turns_recovery_off() -> None:
    s = load_settings(env={"LEADFLOW_REDIS_URL": "", "LEADFLOW_RECOVERY_DIR": ""})
    assert s.redis.url == load_settings(env={}).redis.url
    assert s.dataflow.recovery_dir == ""


def test_broken_toml_and_missing_files_are_reported(config: Path) -> None:
    (config / "routing.toml").write_text("[routing\n")
    with pytest.raises(ConfigError, match=r"routing\.toml: -: not valid TOML"):
        load_settings(config, env={})
    (config / "roster.toml").unlink()
    with pytest.raises(ConfigError):
        load_settings(config, env={})


def test_secrets_may_come_from_files_and_an_unreadable_one_stops_start_up(tmp_path: Path) -> None:
    secret = tmp_path / "redis-url"
    secret.write_text("redis://:s3cret@h:1/0\n")
    s = load_settings(env={"LEADFLOW_REDIS_URL_FILE": str(secret)})
    assert s.redis.url == "redis://:s3cret@h:1/0"
    direct = load_settings(
        env={"LEADFLOW_REDIS_URL_FILE": str(secret), "LEADFLOW_REDIS_URL": "redis://h:2/0"}
    )
    assert direct.redis.url == "redis://h:2/0"
    assert with_secret_files({"SSL_CERT_FILE": "/nonexistent"}) == {"SSL_CERT_FILE": "/nonexistent"}
    with pytest.raises(ConfigError) as e:
        load_settings(env={"LEADFLOW_KAFKA_OPT_SASL_PASSWORD_FILE": str(tmp_path / "missing")})
    assert "LEADFLOW_KAFKA_OPT_SASL_PASSWORD_FILE" in str(e.value)


def test_secrets_are_masked() -> None:
    assert mask_url("redis://user:pw@host:1/0") == "redis://user:***@host:1/0"
    assert mask_url("redis://host:1/0") == "redis://host:1/0"
    s = load_settings(
        env={"LEADFLOW_REDIS_URL": "redis://:pw@h:1/0", "LEADFLOW_KAFKA_OPT_SASL_PASSWORD": "pw"}
    )
    shown = masked(s)
    assert shown["redis"]["url"] == "redis://:***@h:1/0"
    assert shown["kafka"]["options"]["sasl.password"] == "***"
    assert shown["identity"]["salt"] == "***"


def test_the_identity_salt_comes_from_the_environment_and_the_shipped_one_is_refused(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "salt"
    secret.write_text("a-long-random-secret\n")
    from_file = load_settings(env={"LEADFLOW_IDENTITY_SALT_FILE": str(secret)})
    assert from_file.identity.salt == "a-long-random-secret"
    check_private_salt(from_file, {})  # a salt of one's own: fine
    shipped = load_settings(env={})
    with pytest.raises(ConfigError, match=r"engine\.toml: identity\.salt: is the shipped"):
        check_private_salt(shipped, {})
    check_private_salt(shipped, {"LEADFLOW_ALLOW_SHIPPED_SALT": "1"})  # demo and tests


def test_grade_bands_need_a_floor(config: Path) -> None:
    edit(config / "scoring.toml", "D = 0.0", "D = 10.0")
    with pytest.raises(ConfigError) as e:
        load_settings(config, env={})
    assert e.value.key == "grade.fit_bands" and "minimum of 0" in e.value.problem


def test_known_people_are_looked_up_on_every_worker_once_there_are_several() -> None:
    dataflow = load_settings().dataflow
    assert dataflow.identity_lookup == "auto"
    assert [dataflow.looks_up_identity(w) for w in (1, 2)] == [False, True]
    on, off = replace(dataflow, identity_lookup="on"), replace(dataflow, identity_lookup="off")
    assert on.looks_up_identity(1) and not off.looks_up_identity(4)


def test_a_kind_named_like_a_one_id_is_refused(config: Path) -> None:
    """The identity keys tell a founding identifier's kind from a One-ID by its shape."""
    with (config / "engine.toml").open("a") as f:
        f.write('\n[identity.kinds.0123456789abcdef]\npaths = ["traits.crm_id"]\n')
    with pytest.raises(ConfigError) as e:
        load_settings(config, env={})
    assert e.value.file == str(config / "engine.toml")
    assert "named like a One-ID" in e.value.problem
    (config / "engine.toml").write_text(
        (config / "engine.toml").read_text().replace("0123456789abcdef", "crm")
    )
    assert "crm" in {k.name for k in load_settings(config, env={}).identity.kinds}
