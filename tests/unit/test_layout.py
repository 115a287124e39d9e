"""The layout holds: a pure core, one Kafka boundary, fakes that match the real interfaces."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from stream.kafka.consumer import GroupConsumer
from stream.kafka.control_log import ControlLog
from stream.kafka.producer import OutputProducer
from stream.kafka.reader import PartitionReader
from tests.support.fakes import FakeControlLog, FakeGroupConsumer, FakeProducer, FakeReader

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"aiokafka", "anyio", "torch", "transformers"}
CONTEXT_METHODS = ("__aenter__", "__aexit__")


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a module imports (anywhere in it, lazily or not)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    "path",
    sorted((ROOT / "stream" / "core").glob("*.py")) + sorted((ROOT / "schemas").glob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_pure_core_and_the_schemas_import_no_client_runtime_or_model(path: Path) -> None:
    assert imported_roots(path) & HEAVY == set()


def test_nothing_outside_the_kafka_boundary_imports_the_kafka_client() -> None:
    leaks = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "stream").rglob("*.py"))
        if "aiokafka" in imported_roots(path) and path.parent.name != "kafka"
    ]
    assert leaks == []


@pytest.mark.parametrize(
    ("fake", "real"),
    [
        (FakeProducer, OutputProducer),
        (FakeGroupConsumer, GroupConsumer),
        (FakeReader, PartitionReader),
        (FakeControlLog, ControlLog),
    ],
)
def test_each_fake_has_the_public_methods_of_its_boundary_class(fake: type, real: type) -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in vars(cls).items()
            if callable(member) and (not name.startswith("_") or name in CONTEXT_METHODS)
        }

    real_methods = public(real)
    fake_methods = public(fake)
    missing = set(real_methods) - set(fake_methods)
    assert missing == set()
    for name, signature in real_methods.items():
        assert list(fake_methods[name].parameters) == list(signature.parameters), name
