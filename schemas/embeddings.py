"""EmbeddingRecord: the value on every `embeddings.<model>` topic."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

Path = Literal["live", "backfill"]


class SourceRef(msgspec.Struct, frozen=True, kw_only=True):
    """Where the atom event that produced a record sits in the atoms topic."""

    topic: str
    partition: int
    offset: int

    def header(self) -> str:
        """The `lattice.source-offset` header value: `<topic>/<partition>/<offset>`."""
        return f"{self.topic}/{self.partition}/{self.offset}"


class EmbeddingRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One atom's vector under one model."""

    atom_id: str
    model: str
    dim: int
    vector: list[float]
    normalized: bool
    source: SourceRef
    path: Path = "live"
    migration_id: str | None = None
    embedded_at: datetime | None = None
