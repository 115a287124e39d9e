"""Configuration: TOML, environment overrides, and one clear line per error."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream.config import bundled_model_path, load_config
from stream.errors import ConfigError
from stream.ops.cli import main


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_resolve_the_bundled_model() -> None:
    config = load_config(None, {})
    assert config.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert config.routing.stable_model == "minilm"
    assert config.models["minilm"].path == bundled_model_path()
    assert config.models["minilm"].max_tokens == 256
    assert config.topics.embeddings("minilm") == "embeddings.minilm"


def test_file_and_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[kafka]\ngroup_id = "g"\n[topics]\npartitions = 6\n'
        '[models.bge-small]\npath = "/m/bge"\npooling = "cls"\nquery_prefix = "q: "\n'
        '[limits]\non_overlong = "dead_letter"\n',
    )
    config = load_config(
        path,
        {
            "LATTICE_BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
            "LATTICE_TOPICS_PARTITIONS": "12",
            "LATTICE_KAFKA_SESSION_TIMEOUT_MS": "9000",
            "LATTICE_CONFIG": "ignored",
            "HOME": "/root",
        },
    )
    assert config.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert config.kafka.group_id == "g" and config.kafka.session_timeout_ms == 9000
    assert config.topics.partitions == 12
    assert config.models["bge-small"].pooling == "cls"
    assert config.limits.on_overlong == "dead_letter"
    assert set(config.models) == {"minilm", "bge-small"}


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[topics]\npartitions = 0\n", {}, "config: topics.partitions: Expected `int` >= 1"),
        ("[topics]\nnope = 1\n", {}, "config: topics: unknown key `nope`"),
        ("[kafka\n", {}, "not valid TOML"),
        (
            '[routing]\nstable_model = "bge"\n',
            {},
            "config: routing.stable_model: unknown model 'bge' (configured: minilm)",
        ),
        ('[models.x]\npooling = "max"\n', {}, "config: models.x.pooling: Invalid enum value 'max'"),
        ('[models.x]\npooling = "mean"\n', {}, "config: models.x: needs path or hf_id"),
        (
            '[models.x]\npath = "a"\nhf_id = "b"\n',
            {},
            "config: models.x: set path or hf_id, not both",
        ),
        (
            '[models."bad name"]\npath = "a"\n',
            {},
            "config: models.bad name: a model name may use only",
        ),
        (
            "",
            {"LATTICE_LIMITS_MAX_EVENT_BYTES": "lots"},
            "environment: LATTICE_LIMITS_MAX_EVENT_BYTES (limits.max_event_bytes): Expected `int`",
        ),
        ("", {"LATTICE_NOPE": "1"}, "environment: LATTICE_NOPE names no setting"),
        (
            "[kafka]\nexactly_once = true\nenable_idempotence = false\n",
            {},
            "kafka.exactly_once: transactions need idempotent producers",
        ),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_bad_config_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[topics]\npartitions = -1\n")
    assert main(["status", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == "lattice-embed: config: topics.partitions: Expected `int` >= 1\n"


def test_cli_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", "/nonexistent/lattice.toml"]) == 2
    assert (
        "config file /nonexistent/lattice.toml: No such file or directory"
        in capsys.readouterr().err
    )


def test_json_log_lines_carry_level_logger_and_message() -> None:
    import logging

    import msgspec

    from stream.ops.logs import JsonLines

    record = logging.LogRecord(
        "stream.processor.live", logging.INFO, __file__, 1, "window %d", (7,), None
    )
    entry = msgspec.json.decode(JsonLines().format(record))
    assert entry["level"] == "INFO" and entry["logger"] == "stream.processor.live"
    assert entry["message"] == "window 7" and entry["ts"].endswith("+00:00")


def test_environment_values_take_their_setting_type_and_strings_stay_as_given() -> None:
    config = load_config(
        None,
        {
            "LATTICE_KAFKA_SASL_PLAIN_PASSWORD": "123456",
            "LATTICE_KAFKA_CLIENT_ID": '"abc"',
            "LATTICE_KAFKA_ENABLE_IDEMPOTENCE": "false",
            "LATTICE_BATCHING_MAX_WAIT_MS": "20",
        },
    )
    assert config.kafka.sasl_plain_password == "123456"
    assert config.kafka.client_id == '"abc"'
    assert config.kafka.enable_idempotence is False
    assert config.batching.max_wait_ms == 20
    with pytest.raises(ConfigError, match="LATTICE_BATCHING_MAX_WAIT_MS"):
        load_config(None, {"LATTICE_BATCHING_MAX_WAIT_MS": "soon"})


def test_the_kafka_password_never_shows_in_a_repr() -> None:
    config = load_config(None, {"LATTICE_KAFKA_SASL_PLAIN_PASSWORD": "s3cret-pw"})
    assert "s3cret-pw" not in repr(config) and "s3cret-pw" not in repr(config.kafka)
    assert "sasl_plain_password='***'" in repr(config.kafka)
    assert "sasl_plain_password=None" in repr(load_config(None, {}).kafka)
    serving = load_config(
        None,
        {"LATTICE_SERVE_API_KEYS": "k-one,k-two", "LATTICE_SINK_DSN": "postgresql://u:pw@h/db"},
    )
    assert serving.serve.api_keys == ["k-one", "k-two"]
    assert "k-one" not in repr(serving) and "pw@h" not in repr(serving)
