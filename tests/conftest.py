"""Fixtures for every test: the anyio backend and tiny models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from tests.support.models import build_tiny_bert


@pytest.fixture
def anyio_backend() -> str:
    """aiokafka runs on asyncio only."""
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer (seed 1)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-a"), seed=1)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different tiny model (seed 2, 48 wide): a migration target."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-b"), seed=2, hidden=48)


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """A blocking call (file or socket I/O, time.sleep) that the project's code makes on a
    running event loop fails the test; a test's own set-up I/O does not count."""
    with blockbuster_ctx(["stream", "schemas"]) as detector:
        for function in detector.functions.values():
            # Configuration is read once before the event loop starts; tests call it inside.
            function.can_block_in("stream/config.py", "load_config")
        yield detector


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration needs the real broker: mark it `kafka`."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.kafka)
