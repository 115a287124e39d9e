"""RocksDB (through `rocksdict`) as the key store uses it: tuning, options, opening."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import quote

import rocksdict

from schemas.errors import LatticeError


class StateError(LatticeError):
    """The state directory cannot be used (locked by another process, or not this one's)."""


class StateBusy(StateError):
    """A partition's state is held by another process on this machine: a worker that owned
    the partition has not released it yet (its revocation is late, or it is a zombie whose
    session expired). Transient: retry later."""


@dataclass(frozen=True, slots=True)
class Tuning:
    """RocksDB memory and disk knobs; the defaults keep RSS growth to a few tens of MB."""

    cache_bytes: int = 32 << 20
    """One LRU cache for data, index and filter blocks *and* memtables, shared by every
    partition this store has open: the bound on the store's memory."""
    write_buffer_bytes: int = 4 << 20
    """Memtable size per partition (two at most; charged to the cache)."""
    max_open_files: int = 64
    """Per partition: table readers held open."""
    bloom_bits_per_key: int = 10
    max_wal_bytes: int = 16 << 20


def rocks_options(
    tuning: Tuning, cache: rocksdict.Cache, write_buffers: rocksdict.WriteBufferManager
) -> rocksdict.Options:
    """Options for one partition's database: its memory charged to the shared cache."""
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(tuning.write_buffer_bytes)
    options.set_max_write_buffer_number(2)
    options.set_write_buffer_manager(write_buffers)
    options.set_max_open_files(tuning.max_open_files)
    options.set_max_total_wal_size(tuning.max_wal_bytes)
    options.set_compression_type(rocksdict.DBCompressionType.lz4())
    options.set_keep_log_file_num(2)
    options.set_max_log_file_size(1 << 20)
    options.set_max_background_jobs(2)
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(cache)
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    table.set_bloom_filter(tuning.bloom_bits_per_key, False)
    # Partitioned index and filters: a lookup loads one small partition of each, not a
    # whole file's filter, so a cache far smaller than the data does not thrash.
    table.set_index_type(rocksdict.BlockBasedIndexType.two_level_index_search())
    table.set_partition_filters(True)
    table.set_metadata_block_size(4096)
    table.set_pin_top_level_index_and_filter(True)
    options.set_block_based_table_factory(table)
    return options


def open_db(path: Path, options: rocksdict.Options) -> rocksdict.Rdict:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return rocksdict.Rdict(str(path), options)
    except Exception as exc:  # rocksdict raises a bare Exception for a held lock
        if "lock" in str(exc).lower():
            raise StateBusy(f"cannot open the state at {path}: {exc}") from exc
        raise StateError(f"cannot open the state at {path}: {exc}") from exc


def get_many(db: rocksdict.Rdict, keys: list[bytes]) -> list[bytes | None]:
    """One multi-get (values are bytes: the database is in raw mode)."""
    if not keys:
        return []
    values = db.get(cast(list[str | int | float | bytes | bool], keys))
    return cast(list[bytes | None], values)


def migration_dir(migration_id: str) -> str:
    """A safe directory name; a long id is cut and suffixed with its hash (the identity
    stored in each partition's state catches anything that still collides)."""
    name = quote(migration_id, safe="")
    if len(name) > 120:
        name = name[:80] + "-" + hashlib.sha256(migration_id.encode("utf-8")).hexdigest()[:32]
    return "m-" + name
