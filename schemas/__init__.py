"""Message schemas: everything that crosses a Kafka topic. No I/O, no torch, no aiokafka."""

from schemas.atoms import AtomCreated, AtomDeleted, AtomEvent, InvalidAtom, decode_atom
from schemas.control import (
    BackfillConfig,
    CancelMigration,
    CancelReplay,
    ControlCommand,
    Finalize,
    PauseMigration,
    ResumeMigration,
    Rollback,
    StartMigration,
    StartReplay,
)
from schemas.deadletter import DeadLetterHeaders, decode_dead_letter_headers
from schemas.embeddings import EmbeddingRecord, PackedEmbeddingRecord, SourceRef, decode_embedding
from schemas.errors import LatticeError
from schemas.routing import (
    EmbeddingRoutingConfig,
    MigrationState,
    Progress,
    Rejection,
    ReplayState,
    ReplayStatus,
    RoutingPhase,
    RoutingStatus,
)

__all__ = [
    "AtomCreated",
    "AtomDeleted",
    "AtomEvent",
    "BackfillConfig",
    "CancelMigration",
    "CancelReplay",
    "ControlCommand",
    "DeadLetterHeaders",
    "EmbeddingRecord",
    "EmbeddingRoutingConfig",
    "Finalize",
    "InvalidAtom",
    "LatticeError",
    "MigrationState",
    "PackedEmbeddingRecord",
    "PauseMigration",
    "Progress",
    "Rejection",
    "ReplayState",
    "ReplayStatus",
    "ResumeMigration",
    "Rollback",
    "RoutingPhase",
    "RoutingStatus",
    "SourceRef",
    "StartMigration",
    "StartReplay",
    "decode_atom",
    "decode_dead_letter_headers",
    "decode_embedding",
]
