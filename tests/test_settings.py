"""The settings declaration: environment and `.env` parsing, bounds and choices, the error
messages, the CLI flags and the generated `docs/reference/settings.md`."""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.ops.cli import _add_settings_flags, _settings
from gateway.settings import SETTINGS, ConfigError, Settings, settings_table
from gateway.web import protocol

DOC = Path(__file__).resolve().parent.parent / "docs" / "reference" / "settings.md"

# Every variable and its default: users' environments and scripts depend on them.
VARIABLES = [
    ("REDIS_URL", None),
    ("FLASHGATE_REDIS_CLUSTER", False),
    ("FLASHGATE_REDIS_TIMEOUT_MS", 1000),
    ("FLASHGATE_REDIS_MAX_CONNECTIONS", 64),
    ("FLASHGATE_CLAIM_STALE_MS", 5000),
    ("FLASHGATE_REDIS_CLIENT", "mux"),
    ("FLASHGATE_APPENDFSYNC", "everysec"),
    ("FLASHGATE_EMBEDDED_ALLOCATOR", "mimalloc"),
    ("FLASHGATE_WAITAOF_LOCAL", 0),
    ("FLASHGATE_WAITAOF_REPLICAS", 0),
    ("FLASHGATE_ADMIN_TOKEN", None),
    ("FLASHGATE_PAYMENT_SECRET", None),
    ("FLASHGATE_HOLD_TTL_S", 900),
    ("FLASHGATE_IDEMPOTENCY_TTL_S", 86400),
    ("FLASHGATE_QPS", 5000.0),
    ("FLASHGATE_BURST", 1000),
    ("FLASHGATE_BREAKER_RT_MS", 800),
    ("FLASHGATE_BREAKER_SLOW_RATIO", 0.5),
    ("FLASHGATE_BREAKER_MIN_CALLS", 5),
    ("FLASHGATE_BREAKER_WINDOW_MS", 1000),
    ("FLASHGATE_BREAKER_OPEN_S", 10.0),
    ("FLASHGATE_CLIENT_QPS", 0.0),
    ("FLASHGATE_CLIENT_BURST", 0),
    ("FLASHGATE_USER_QPS", 0.0),
    ("FLASHGATE_USER_BURST", 0),
    ("FLASHGATE_TRUSTED_PROXIES", ""),
    ("FLASHGATE_MAX_QUANTITY", 100),
    ("FLASHGATE_MAX_BODY_BYTES", 4096),
    ("FLASHGATE_CLIENT_TIMEOUT_S", 10.0),
    ("FLASHGATE_QUEUE_MAX", 50000),
    ("FLASHGATE_MODE_REFRESH_MS", 500),
    ("FLASHGATE_FIGURES_MAX_AGE_MS", 1000),
    ("FLASHGATE_SOLDOUT_RECHECK_MS", 1000),
    ("FLASHGATE_BUCKET_FILE", None),
    ("FLASHGATE_FINALIZER_BATCH", 200),
    ("FLASHGATE_FINALIZER_BLOCK_MS", 1000),
    ("FLASHGATE_FINALIZER_CLAIM_IDLE_MS", 30000),
    ("FLASHGATE_DRAW_BATCH", 100),
    ("FLASHGATE_FINALIZER_MAX_DELIVERIES", 5),
    ("FLASHGATE_SWEEP_INTERVAL_MS", 1000),
    ("FLASHGATE_SWEEP_BATCH", 100),
    ("FLASHGATE_RELAY_URL", None),
    ("FLASHGATE_RELAY_SECRET", None),
    ("FLASHGATE_RELAY_QUEUE", "queue_order_create"),
    ("FLASHGATE_RELAY_PREFETCH", 200),
    ("FLASHGATE_RELAY_MAX_ATTEMPTS", 10),
    ("FLASHGATE_BUSY_MESSAGE", "活动火爆,请稍后再试"),
    ("FLASHGATE_DATA_DIR", ".flashgate"),
    ("FLASHGATE_HOST", "127.0.0.1"),
    ("FLASHGATE_PORT", 8080),
    ("FLASHGATE_WORKERS", 1),
    ("FLASHGATE_ACCESS_LOG", False),
    ("FLASHGATE_FAST_PATH", True),
    ("FLASHGATE_LOG_LEVEL", "info"),
    ("FLASHGATE_LOG_FORMAT", "json"),
]


def read(env: dict[str, str], dotenv: Path | None = None) -> Settings:
    return Settings.from_env(env, dotenv=dotenv)


def test_the_committed_reference_is_the_generated_one() -> None:
    """Edit the declaration in gateway/settings.py, then
    `python -m gateway.settings --markdown > docs/reference/settings.md`."""
    assert DOC.read_text(encoding="utf-8") == settings_table()


def test_the_generator_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway.settings", "--markdown"],
        capture_output=True,
        check=True,
    )
    assert out.stdout.decode("utf-8") == settings_table()


def test_every_variable_and_default_is_kept() -> None:
    assert [(s.env, s.default) for s in SETTINGS] == VARIABLES
    assert read({}) == Settings()
    assert all(s.description for s in SETTINGS)


def test_every_setting_is_in_the_reference_table() -> None:
    table = settings_table()
    for s in SETTINGS:
        assert f"| `{s.env}` | `{s.flag}` |" in table


def test_environment_wins_over_dotenv_which_wins_over_defaults(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# a comment\n\nexport FLASHGATE_PORT=9000\nFLASHGATE_HOST = '0.0.0.0'\n"
        'FLASHGATE_BUSY_MESSAGE="busy, try again"\nFLASHGATE_QPS=7\n',
        encoding="utf-8",
    )
    settings = read({"FLASHGATE_QPS": "12.5", "FLASHGATE_WORKERS": ""}, dotenv)
    assert (settings.port, settings.host) == (9000, "0.0.0.0")
    assert settings.busy_message == "busy, try again"
    assert settings.qps == 12.5  # the environment's
    assert settings.workers == 1  # empty is unset
    assert read({}, tmp_path / "missing.env") == Settings()


def test_values_are_typed() -> None:
    settings = read(
        {
            "REDIS_URL": "redis://h:1/0",
            "FLASHGATE_PORT": " 9001 ",
            "FLASHGATE_BREAKER_OPEN_S": "2",
            "FLASHGATE_WAITAOF_LOCAL": "1",
            "FLASHGATE_REDIS_CLIENT": "pool",
        }
    )
    assert settings.redis_url == "redis://h:1/0"
    assert settings.port == 9001
    assert settings.breaker_open_s == 2.0 and isinstance(settings.breaker_open_s, float)
    assert (settings.waitaof_local, settings.redis_client) == (1, "pool")


@pytest.mark.parametrize(
    ("words", "expected"),
    [(("1", "true", "YES", " on "), True), (("0", "False", "no", "OFF"), False)],
)
def test_booleans_take_the_usual_words(words: tuple[str, ...], expected: bool) -> None:
    for word in words:
        assert read({"FLASHGATE_ACCESS_LOG": word}).access_log is expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FLASHGATE_PORT", "0"),
        ("FLASHGATE_PORT", "65535"),
        ("FLASHGATE_MODE_REFRESH_MS", "1000"),
        ("FLASHGATE_BREAKER_SLOW_RATIO", "0"),
        ("FLASHGATE_BREAKER_SLOW_RATIO", "1"),
        ("FLASHGATE_WAITAOF_REPLICAS", "0"),
        ("FLASHGATE_FINALIZER_CLAIM_IDLE_MS", "0"),
        ("FLASHGATE_QPS", "0.001"),
        ("FLASHGATE_LOG_FORMAT", "text"),
        ("FLASHGATE_APPENDFSYNC", "always"),
    ],
)
def test_values_at_the_bounds_are_taken(variable: str, value: str) -> None:
    read({variable: value})


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "FLASHGATE_HOLD_TTL_S",
            "soon",
            "FLASHGATE_HOLD_TTL_S must be an integer >= 1, got 'soon'",
        ),
        ("FLASHGATE_BURST", "0", "FLASHGATE_BURST must be an integer >= 1, got '0'"),
        ("FLASHGATE_PORT", "65536", "FLASHGATE_PORT must be an integer within 0..65535"),
        ("FLASHGATE_MODE_REFRESH_MS", "1001", "FLASHGATE_MODE_REFRESH_MS must be an integer wit"),
        ("FLASHGATE_QPS", "0", "FLASHGATE_QPS must be a number > 0, got '0'"),
        ("FLASHGATE_CLIENT_TIMEOUT_S", "-1", "FLASHGATE_CLIENT_TIMEOUT_S must be a number > 0"),
        ("FLASHGATE_BREAKER_SLOW_RATIO", "1.5", "FLASHGATE_BREAKER_SLOW_RATIO must be a number"),
        ("FLASHGATE_WAITAOF_REPLICAS", "-1", "FLASHGATE_WAITAOF_REPLICAS must be an integer >= 0"),
        ("FLASHGATE_WAITAOF_LOCAL", "2", "FLASHGATE_WAITAOF_LOCAL must be 0 or 1, got '2'"),
        ("FLASHGATE_REDIS_CLIENT", "x", "FLASHGATE_REDIS_CLIENT must be mux or pool, got 'x'"),
        ("FLASHGATE_APPENDFSYNC", "no", "FLASHGATE_APPENDFSYNC must be everysec or always"),
        (
            "FLASHGATE_EMBEDDED_ALLOCATOR",
            "jemalloc",
            "FLASHGATE_EMBEDDED_ALLOCATOR must be mimalloc or libc",
        ),
        ("FLASHGATE_LOG_FORMAT", "xml", "FLASHGATE_LOG_FORMAT must be json or text"),
        ("FLASHGATE_ACCESS_LOG", "maybe", "FLASHGATE_ACCESS_LOG must be 1/true/yes/on or 0/f"),
    ],
)
def test_a_bad_value_names_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read({variable: value})
    assert str(caught.value).startswith(message)


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="FLASHGATE_WORKERS must be an integer >= 1, got 0"):
        Settings(workers=0)
    with pytest.raises(ConfigError, match="FLASHGATE_MODE_REFRESH_MS"):
        Settings().replace(mode_refresh_ms=5000)
    assert Settings().replace(port=9).port == 9


def test_cluster_checks_look_at_several_settings() -> None:
    with pytest.raises(ConfigError, match="FLASHGATE_REDIS_CLUSTER=1 needs a redis://"):
        read({"FLASHGATE_REDIS_CLUSTER": "1", "REDIS_URL": "unix:///tmp/r.sock"})
    with pytest.raises(ConfigError, match="in cluster mode need FLASHGATE_REDIS_CLIENT=mux"):
        Settings(redis_cluster=True, waitaof_local=1, redis_client="pool")
    Settings(redis_cluster=True, waitaof_local=1, redis_url="rediss://h:1")


def test_trusted_proxies_take_addresses_and_cidrs_and_name_a_bad_entry() -> None:
    given = " 10.0.0.1, 10.1.0.0/16 ,, ::1, fd00::/8 "
    assert read({"FLASHGATE_TRUSTED_PROXIES": given}).trusted_proxies == given
    for bad in ("10.0.0.300", "proxy.example", "10.0.0.0/33", "10.0.0.1;10.0.0.2"):
        with pytest.raises(ConfigError, match="FLASHGATE_TRUSTED_PROXIES: .* is not an IP"):
            read({"FLASHGATE_TRUSTED_PROXIES": bad})
    with pytest.raises(ConfigError, match="FLASHGATE_CLIENT_QPS must be a number >= 0"):
        read({"FLASHGATE_CLIENT_QPS": "-1"})


def test_to_env_gives_the_same_settings_back() -> None:
    settings = Settings(
        redis_url="redis://h:1/0", access_log=True, qps=12.5, payment_secret="s", port=9
    )
    env = settings.to_env()
    assert env["FLASHGATE_ACCESS_LOG"] == "1" and env["FLASHGATE_QPS"] == "12.5"
    assert "FLASHGATE_BUCKET_FILE" not in env  # unset stays unset
    assert read(env) == settings


def test_secrets_are_never_shown() -> None:
    settings = Settings(admin_token="adm-s3cret", payment_secret="pay-s3cret")
    assert "s3cret" not in repr(settings)
    assert {s.name for s in SETTINGS if s.secret} == {
        "admin_token",
        "payment_secret",
        "relay_url",
        "relay_secret",
    }
    with pytest.raises(ConfigError) as caught:
        Settings(admin_token=["s3cret"])  # type: ignore[arg-type]
    assert "FLASHGATE_ADMIN_TOKEN" in str(caught.value) and "s3cret" not in str(caught.value)


def parse_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    return parser.parse_args(argv)


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("FLASHGATE_PORT", "9000")
    monkeypatch.setenv("FLASHGATE_HOST", "0.0.0.0")
    monkeypatch.setenv("FLASHGATE_ACCESS_LOG", "1")
    settings = _settings(parse_flags("--port", "9001", "--no-access-log", "--qps", "7.5"))
    assert (settings.port, settings.host, settings.access_log, settings.qps) == (
        9001,
        "0.0.0.0",
        False,
        7.5,
    )
    assert _settings(parse_flags("--redis-cluster", "--redis-url", "redis://h:1")).redis_cluster
    with pytest.raises(ConfigError, match="FLASHGATE_WORKERS must be"):
        _settings(parse_flags("--workers", "many"))


def test_every_setting_has_a_flag_with_its_description() -> None:
    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    helps = {a.dest: a.help or "" for a in parser._actions}
    for s in SETTINGS:
        assert s.env in helps[s.name]
        assert s.description.replace("`", "")[:40] in helps[s.name]
    parser.format_help()  # no stray % in a help text


def test_the_client_timeout_comes_from_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("FLASHGATE_CLIENT_TIMEOUT_S", "2.5")
    protocol.read_timeout_s.cache_clear()
    try:
        assert protocol.read_timeout_s() == 2.5
        monkeypatch.setenv("FLASHGATE_CLIENT_TIMEOUT_S", "0")
        assert protocol.read_timeout_s() == 2.5  # read once
        protocol.read_timeout_s.cache_clear()
        with pytest.raises(ConfigError, match="FLASHGATE_CLIENT_TIMEOUT_S must be a number > 0"):
            protocol.read_timeout_s()
    finally:
        protocol.read_timeout_s.cache_clear()


WHSEC = "whsec_" + base64.b64encode(b"k" * 32).decode()


@pytest.mark.parametrize(
    ("url", "secret", "message"),
    [
        ("ftp://erp.example/orders", None, "must be an http://, https:// (webhook), amqp://"),
        ("erp.example/orders", None, "got no scheme"),
        ("https:///orders", WHSEC, "names no host"),
        ("http://erp.example:port/x", WHSEC, "is not a URL"),
        ("https://erp.example/orders", None, "FLASHGATE_RELAY_SECRET is required"),
        ("https://erp.example/orders", "s3cret-not-whsec", "must be whsec_ followed by base64"),
        ("https://erp.example/orders", "whsec_!!!", "must be whsec_ followed by base64"),
        ("https://erp.example/orders", "whsec_" + base64.b64encode(b"short").decode(), "24 to 64"),
    ],
)
def test_a_bad_relay_target_is_refused_at_start(url: str, secret: str | None, message: str) -> None:
    env = {"FLASHGATE_RELAY_URL": url, **({"FLASHGATE_RELAY_SECRET": secret} if secret else {})}
    with pytest.raises(ConfigError) as caught:
        read(env)
    assert message in str(caught.value)
    assert "s3cret" not in str(caught.value) and "!!!" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("https://erp.example/orders", WHSEC),
        ("http://127.0.0.1:9000/hook", WHSEC),
        ("amqp://guest:s3cret@127.0.0.1:5672/%2f", None),
        ("amqps://broker.example/vhost", None),
    ],
)
def test_a_usable_relay_target_is_taken(url: str, secret: str | None) -> None:
    settings = read(
        {"FLASHGATE_RELAY_URL": url, **({"FLASHGATE_RELAY_SECRET": secret} if secret else {})}
    )
    assert settings.relay_url == url and settings.relay_secret == secret
    assert "s3cret" not in repr(settings)
