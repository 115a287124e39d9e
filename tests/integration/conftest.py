"""The real Kafka broker, started once per test session, and a processor factory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream.config import Config, load_config
from tests.support.kafka import Broker, start_local_broker, stop_local_broker, unique


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A running broker: $KAFKA_TEST_BOOTSTRAP, or the local one (stopped if started here)."""
    running = start_local_broker()
    yield running
    if running.started_here:
        stop_local_broker()


@pytest.fixture
def bootstrap(broker: Broker) -> str:
    """The broker's bootstrap address."""
    return broker.bootstrap


def write_config(
    directory: Path,
    bootstrap: str,
    *,
    models: dict[str, Path | None],
    stable: str,
    atoms: str,
    extra: str = "",
) -> Path:
    """A TOML config with fresh topic and group names; a None model path means the bundled one."""
    prefix = unique("t")
    lines = [
        "[kafka]",
        f'bootstrap_servers = "{bootstrap}"',
        f'group_id = "{prefix}-group"',
        "session_timeout_ms = 10000",
        "[topics]",
        f'atoms = "{atoms}"',
        f'control = "{prefix}.control"',
        f'routing = "{prefix}.routing"',
        f'dlq = "{prefix}.dlq"',
        f'embeddings_prefix = "{prefix}.embeddings."',
        "[routing]",
        f'stable_model = "{stable}"',
        "[state]",
        f'dir = "{directory / "state"}"',
    ]
    if "[metrics]" not in extra:
        lines += ["[metrics]", "port = 0"]  # any free port: tests run processors side by side
    for name, path in models.items():
        lines.append(f"[models.{name}]")
        if path is not None:
            lines.append(f'path = "{path}"')
    path = directory / f"{prefix}.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@pytest.fixture
def make_config(tmp_path: Path, bootstrap: str, tiny_model: Path) -> Any:
    """Factory: `make_config(atoms_topic, **options)` -> (Config, path)."""

    def factory(
        atoms: str,
        *,
        models: dict[str, Path | None] | None = None,
        stable: str = "tiny",
        extra: str = "",
    ) -> tuple[Config, Path]:
        path = write_config(
            tmp_path,
            bootstrap,
            models=models if models is not None else {"tiny": tiny_model},
            stable=stable,
            atoms=atoms,
            extra=extra,
        )
        config: Config = load_config(path, {})
        return config, path

    return factory


@pytest.fixture
def migration_config(make_config: Any, tiny_model: Any, tiny_model_b: Any) -> Any:
    def factory(atoms: str) -> tuple[Config, Path]:
        made: tuple[Config, Path] = make_config(
            atoms,
            models={"tiny": tiny_model, "tinyb": tiny_model_b},
            extra="[batching]\nwindow_atoms = 32\nmicro_batch_atoms = 16\n",
        )
        return made

    return factory
