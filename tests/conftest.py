"""Fixtures for every test: the anyio backend and tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

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
