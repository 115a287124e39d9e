"""Bounded on-disk state for the skip rule and latest-versions-only backfill.

For one partition of one migration (`migration_id`, `epoch`, `partition`) the store keeps,
per atom key:

- the offset of the key's last *valid* event below the handoff, and whether it is a delete
  (filled by a keys-only pass over `[log start, handoff)`, `record_history`);
- whether the live path wrote the key at or after the handoff (`mark_live`).

A backfill record is then embedded only if it is its key's latest version below the handoff,
not a delete, and no live write followed (`verdicts` / `should_backfill`). Counters kept in
the same write batches give the honest progress total right after the keys pass.

Choice of store: RocksDB through `rocksdict` (what Quix Streams uses for its state).
Measured on this machine (2 shared cores) before choosing: 1,000,000 keys written in batches
of 4,096 with a read-modify-write each, then 1,000,000 random point reads in batches of 4,096:

| store | writes/s | reads/s | RSS growth | disk |
|---|---|---|---|---|
| RocksDB (`rocksdict`, 16 MiB cache) | 190 k | 105 k | +49 MB (bounded by the cache) | 6 MB |
| LMDB (`lmdb`) | 200 k | 420 k | +90 MB, growing with the file | 75 MB |
| SQLite (WAL, 16 MB cache) | 36 k | 194 k | +19 MB | 30 MB |

LMDB reads fastest, but it serves reads from a memory map: every page touched counts in the
process's RSS (and in a container's memory), so RSS grows with the number of keys, which is
what issue 10 forbids (at 100M keys the map is ~7 GB). SQLite is bounded but five times
slower at the batched upserts of the keys pass. RocksDB keeps memory to what it is given
(block cache and memtables, both charged to one shared `Cache` through a write-buffer
manager, so many open partitions share one bound), compresses (LZ4) to a small disk
footprint, and is the store a production stream processor would use.

With this module's settings (`Tuning`: one 32 MiB cache for blocks and memtables, 4 MiB
memtables, partitioned index and bloom filters so a cache much smaller than the data does
not thrash), `python -m stream.tools.benchkeystore --keys 1000000` (1M events, 700 k keys
with scrambled, UUID-like ids, so lookups in log order get no locality; 2 shared cores, so
+-30% between runs):

| cache | store | decode | batched verdicts | single lookups | RSS growth | disk |
|---|---|---|---|---|---|---|
| 32 MiB (default) | 59 k events/s | 287 k/s | 67 k/s | 41 k/s | +45 MiB | 14.6 MiB |
| 64 MiB | 133 k events/s | 483 k/s | 129 k/s | 66 k/s | +73 MiB | 14.5 MiB |

At 3M events (2.1M keys, sequential ids) the default grew RSS by 53 MiB (+11 MiB over 1M:
table-reader metadata per SST file), 17.8 MiB on disk. Before the partitioned filters, a
32 MiB cache thrashed on whole-file filter blocks: 7 k single lookups/s.

Layout: one RocksDB per (migration, epoch, partition) under
`<dir>/m-<migration>/e<epoch>-p<partition>/`, so a partition's state can be reopened by
whichever local worker owns it next (`release` closes it on revoke), and `drop` deletes a
finished migration's state by removing its directory. Inside, data keys are `k` + the atom
id (UTF-8), values 9 bytes (`>qB`: offset, flags); metadata keys are `m` + a name (counters,
checkpoints, identity, format version).

Rebuilding: the store is a cache of the `atoms` log. An empty (or lost, or wrong-version)
directory simply has no checkpoints: the owner redoes the keys pass from the log start
(`checkpoint(KEYS)` is None), re-marks the live tail `[handoff, position)` in streamed
chunks (`checkpoint(LIVE)` is None), and resumes emission where the control log's progress says
(`restore_emitted`, called before the keys pass). Every write is idempotent (the later offset
wins; marks are sets), so re-reading a range after a crash changes nothing.

Not thread-safe: one task (the partition's live owner) uses a `PartitionKeys` at a time.
"""

from __future__ import annotations

import enum
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import rocksdict

from stream.state.rocks import (
    StateError,
    Tuning,
    get_many,
    migration_dir,
    open_db,
    rocks_options,
)

FORMAT_VERSION = 1

KEYS = "keys"
"""Checkpoint: the keys pass has recorded every event below this offset."""
LIVE = "live"
"""Checkpoint: every key written live in [handoff, this offset) is marked."""

BATCH = 4096
"""Keys per write batch: the most the store holds in Python objects at a time."""

_STATE = struct.Struct(">qB")
_INT = struct.Struct(">q")
_HISTORY, _DELETED, _LIVE = 1, 2, 4
_NO_OFFSET = -1

_T = TypeVar("_T")

_COUNTERS = ("keys", "deletes", "live", "remaining", "emitted", "cursor")


class Verdict(enum.Enum):
    """What backfill does with one historical record."""

    EMBED = "embed"
    """The latest version below the handoff, not deleted, not written live since."""
    TOMBSTONE = "tombstone"
    """The latest version below the handoff is a delete, not written live since: no model
    time; a tombstone keeps the target clean of anything an earlier run left there."""
    SKIP = "skip"
    """Superseded, invalid, or written live since the handoff (the live write wins)."""


@dataclass(frozen=True, slots=True)
class Counts:
    """Per-partition counters, kept exact in the same write batches as the keys."""

    keys: int
    """Distinct keys with a valid event below the handoff."""
    deletes: int
    """Of those, keys whose latest event below the handoff is a delete."""
    live: int
    """Keys written live at or after the handoff."""
    remaining: int
    """Keys backfill will still embed: latest, not deleted, not live, at or past the cursor."""
    emitted: int
    """Keys backfill has embedded (`advance_emitted`)."""
    cursor: int
    """Emission has handled every record below this offset."""

    @property
    def total(self) -> int:
        """The honest progress total: what backfill embeds in all (done + still to do)."""
        return self.emitted + self.remaining


class KeyStore:
    """The state directory: opens one RocksDB per (migration, epoch, partition) on demand."""

    def __init__(self, root: Path, tuning: Tuning) -> None:
        self._root = root
        self._tuning = tuning
        self._cache = rocksdict.Cache(tuning.cache_bytes)
        self._write_buffers = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            tuning.cache_bytes // 2, False, self._cache
        )
        self._open: dict[tuple[str, int, int], PartitionKeys] = {}
        self._closed = False

    @classmethod
    def open(cls, root: str | Path, tuning: Tuning | None = None) -> KeyStore:
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, tuning or Tuning())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def partition(self, migration_id: str, epoch: int, partition: int) -> PartitionKeys:
        """The state of one partition of one migration (created empty if absent)."""
        if self._closed:
            raise StateError("the key store is closed")
        ident = (migration_id, epoch, partition)
        keys = self._open.get(ident)
        if keys is None:
            path = self._root / migration_dir(migration_id) / f"e{epoch}-p{partition}"
            keys = PartitionKeys._open(self, ident, path)
            self._open[ident] = keys
        return keys

    def release(self, migration_id: str, epoch: int, partition: int) -> None:
        """Close one partition's state (revoked: another local worker may open it)."""
        keys = self._open.pop((migration_id, epoch, partition), None)
        if keys is not None:
            keys._close()

    def drop_migration(self, migration_id: str) -> None:
        """Delete every epoch and partition of a migration, open or not."""
        for ident in [i for i in self._open if i[0] == migration_id]:
            self.release(*ident)
        shutil.rmtree(self._root / migration_dir(migration_id), ignore_errors=True)

    def close(self) -> None:
        for ident in list(self._open):
            self.release(*ident)
        self._closed = True

    def _options(self) -> rocksdict.Options:
        return rocks_options(self._tuning, self._cache, self._write_buffers)


class PartitionKeys:
    """Key states of one partition of one migration. Obtain it from `KeyStore.partition`."""

    def __init__(
        self, store: KeyStore, ident: tuple[str, int, int], path: Path, db: rocksdict.Rdict
    ) -> None:
        self._store = store
        self.ident = ident
        self._path = path
        self._db: rocksdict.Rdict | None = db
        values = get_many(db, [_meta(name) for name in _COUNTERS])
        self._counts = dict(zip(_COUNTERS, (_int(v) for v in values), strict=True))

    @classmethod
    def _open(cls, store: KeyStore, ident: tuple[str, int, int], path: Path) -> PartitionKeys:
        identity = repr(ident).encode("utf-8")
        db = open_db(path, store._options())
        version = db.get(_meta("format"))
        if version is not None and _int(version) != FORMAT_VERSION:
            # A cache of the log in an old layout: start over (the owner redoes the keys pass).
            db.close()
            rocksdict.Rdict.destroy(str(path), store._options())
            db = open_db(path, store._options())
            version = None
        if version is None:
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.put(_meta("format"), _INT.pack(FORMAT_VERSION))
            batch.put(_meta("identity"), identity)
            db.write(batch)
        elif db.get(_meta("identity")) != identity:
            db.close()
            raise StateError(f"{path} holds the state of another partition, not {ident}")
        return cls(store, ident, path, db)

    # Keys pass -------------------------------------------------------------------------

    def record_history(
        self, events: Iterable[tuple[str, int, bool]], *, checkpoint: int | None = None
    ) -> None:
        """Record (atom_id, offset, deleted) events below the handoff; the later offset wins.

        `checkpoint`, if given, is stored as `checkpoint(KEYS)` with the last batch: the
        keys pass has read every event below it.
        """
        db = self._live_db()
        chunks = _chunks(events)
        chunk = next(chunks, None)
        if chunk is None and checkpoint is not None:
            # A range of invalid records only: the pass still moves past it (without this
            # the same range would be read again forever).
            self.set_checkpoint(KEYS, checkpoint)
        while chunk is not None:
            following = next(chunks, None)
            latest: dict[bytes, tuple[int, bool]] = {}
            for atom_id, offset, deleted in chunk:
                key = _data(atom_id)
                seen = latest.get(key)
                if seen is None or offset > seen[0]:
                    latest[key] = (offset, deleted)
            keys = list(latest)
            batch = rocksdict.WriteBatch(raw_mode=True)
            cursor = self._counts["cursor"]
            for key, old in zip(keys, get_many(db, keys), strict=True):
                offset, flags = _state(old)
                new_offset, deleted = latest[key]
                if flags & _HISTORY and offset >= new_offset:
                    continue
                new_flags = (flags & _LIVE) | _HISTORY | (_DELETED if deleted else 0)
                self._count_change(offset, flags, new_offset, new_flags, cursor)
                batch.put(key, _STATE.pack(new_offset, new_flags))
            if following is None and checkpoint is not None:
                batch.put(_meta("ck:" + KEYS), _INT.pack(checkpoint))
            self._write(batch)
            chunk = following

    # Live path -------------------------------------------------------------------------

    def mark_live(self, atom_ids: Iterable[str], *, checkpoint: int | None = None) -> None:
        """The live path wrote these keys (record or tombstone) at or after the handoff.

        `checkpoint`, if given, is stored as `checkpoint(LIVE)` with the last batch: every
        key written live in [handoff, checkpoint) is marked.
        """
        db = self._live_db()
        chunks = _chunks(atom_ids)
        chunk = next(chunks, None)
        while chunk is not None:
            following = next(chunks, None)
            keys = list(dict.fromkeys(_data(atom_id) for atom_id in chunk))
            batch = rocksdict.WriteBatch(raw_mode=True)
            cursor = self._counts["cursor"]
            for key, old in zip(keys, get_many(db, keys), strict=True):
                offset, flags = _state(old)
                if flags & _LIVE:
                    continue
                self._count_change(offset, flags, offset, flags | _LIVE, cursor)
                batch.put(key, _STATE.pack(offset, flags | _LIVE))
            if following is None and checkpoint is not None:
                batch.put(_meta("ck:" + LIVE), _INT.pack(checkpoint))
            self._write(batch)
            chunk = following

    # Emission --------------------------------------------------------------------------

    def verdicts(self, records: Sequence[tuple[str, int]]) -> list[Verdict]:
        """What backfill does with each (atom_id, offset) record below the handoff."""
        db = self._live_db()
        verdicts = []
        for (_, offset), value in zip(
            records, get_many(db, [_data(atom_id) for atom_id, _ in records]), strict=True
        ):
            latest, flags = _state(value)
            if not flags & _HISTORY or flags & _LIVE or latest != offset:
                verdicts.append(Verdict.SKIP)
            elif flags & _DELETED:
                verdicts.append(Verdict.TOMBSTONE)
            else:
                verdicts.append(Verdict.EMBED)
        return verdicts

    def should_backfill(self, atom_id: str, offset: int) -> bool:
        """True only if `offset` is the key's latest version below the handoff, it is not a
        delete, and the live path has not written the key since."""
        return self.verdicts([(atom_id, offset)])[0] is Verdict.EMBED

    def advance_emitted(self, offset: int, embedded: int) -> None:
        """Backfill handled every record below `offset` (its outputs are acknowledged);
        `embedded` of them since the last call were EMBED verdicts. Atomic with the counts."""
        if offset < self._counts["cursor"]:
            raise ValueError(f"emission cursor moves forward: {offset} < {self.counts().cursor}")
        if embedded < 0:
            raise ValueError("embedded must not be negative")
        self._counts["cursor"] = offset
        self._counts["emitted"] += embedded
        self._counts["remaining"] -= embedded
        self._write(rocksdict.WriteBatch(raw_mode=True))

    def restore_emitted(self, offset: int, emitted: int) -> None:
        """Rebuilding an empty state: the previous owner handled every record below `offset`
        and embedded `emitted` atoms (both from the progress in the control log). Call it
        before the keys pass: what lies behind the cursor is then never counted as to do."""
        counts = self._counts
        if counts["keys"] or counts["live"] or counts["cursor"] or counts["emitted"]:
            raise StateError(f"the state of {self.ident} is not empty: nothing to restore")
        if offset < 0 or emitted < 0:
            raise ValueError("offset and emitted must not be negative")
        counts["cursor"] = offset
        counts["emitted"] = emitted
        self._write(rocksdict.WriteBatch(raw_mode=True))

    # Counters and checkpoints ----------------------------------------------------------

    def counts(self) -> Counts:
        return Counts(**self._counts)

    def live_count(self) -> int:
        return self._counts["live"]

    def embeddable_count(self) -> int:
        """Atoms backfill embeds in all: latest versions below the handoff that are not
        deletes and were not written live before emission reached them."""
        return self.counts().total

    def set_checkpoint(self, name: str, offset: int) -> None:
        self._live_db().put(_meta("ck:" + name), _INT.pack(offset))

    def checkpoint(self, name: str) -> int | None:
        value = self._live_db().get(_meta("ck:" + name))
        return None if value is None else _int(value)

    def drop(self) -> None:
        """Delete this partition's state (the migration is over, or it is to be rebuilt)."""
        self._store.release(*self.ident)
        rocksdict.Rdict.destroy(str(self._path), self._store._options())
        shutil.rmtree(self._path, ignore_errors=True)

    # Internals -------------------------------------------------------------------------

    def _count_change(
        self, old_offset: int, old_flags: int, new_offset: int, new_flags: int, cursor: int
    ) -> None:
        counts = self._counts
        for sign, offset, flags in ((-1, old_offset, old_flags), (1, new_offset, new_flags)):
            counts["keys"] += sign * bool(flags & _HISTORY)
            counts["deletes"] += sign * bool(flags & _HISTORY and flags & _DELETED)
            counts["live"] += sign * bool(flags & _LIVE)
            counts["remaining"] += sign * (flags & 7 == _HISTORY and offset >= cursor)

    def _write(self, batch: rocksdict.WriteBatch) -> None:
        for name in _COUNTERS:
            batch.put(_meta(name), _INT.pack(self._counts[name]))
        self._live_db().write(batch)

    def _live_db(self) -> rocksdict.Rdict:
        if self._db is None:
            raise StateError(f"the state of {self.ident} is closed")
        return self._db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _chunks(items: Iterable[_T]) -> Iterator[list[_T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, BATCH)):
        yield chunk


def _data(atom_id: str) -> bytes:
    return b"k" + atom_id.encode("utf-8")


def _meta(name: str) -> bytes:
    return b"m" + name.encode("utf-8")


def _state(value: bytes | None) -> tuple[int, int]:
    if value is None:
        return _NO_OFFSET, 0
    offset, flags = _STATE.unpack(value)
    return int(offset), int(flags)


def _int(value: bytes | None) -> int:
    return 0 if value is None else int(_INT.unpack(value)[0])
