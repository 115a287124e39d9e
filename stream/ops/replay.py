"""`lattice-embed replay`: re-embed a range of the atoms topic into one model's topic.

Safe while the processor runs: a key that has a newer event after the range (which the live
path writes, or will) is skipped, so a replay never stales an atom that changed since.
Invalid events are skipped too; the live path dead-lettered them already.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime

from schemas.atoms import InvalidAtom, decode_atom
from stream.config import Config
from stream.core.records import SourceRecord
from stream.embed.pool import ModelPool
from stream.errors import ConfigError
from stream.kafka.admin import Admin
from stream.kafka.producer import OutputProducer
from stream.kafka.reader import PartitionReader
from stream.ops.progress import progress_line
from stream.processor.control import ControlPlane
from stream.processor.inference import Inference
from stream.processor.sensors import ProcessorStats, Sensor
from stream.processor.topics import prepare_topics
from stream.processor.window import WindowProcessor


@dataclass
class ReplayResult:
    """What a replay did."""

    events: int = 0
    embedded: int = 0
    skipped_newer: int = 0
    skipped_invalid: int = 0


def parse_offsets(values: list[str]) -> dict[int, int]:
    """`P:O` pairs -> {partition: offset}."""
    offsets: dict[int, int] = {}
    for value in values:
        partition, sep, offset = value.partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit():
            raise ConfigError(f"replay: {value!r} is not PARTITION:OFFSET")
        offsets[int(partition)] = int(offset)
    return offsets


async def replay(
    config: Config,
    model: str,
    *,
    from_offsets: dict[int, int] | None = None,
    from_time: datetime | None = None,
    to_offsets: dict[int, int] | None = None,
    to_time: datetime | None = None,
    show_progress: bool = True,
) -> ReplayResult:
    """Re-embed [from, to) of every partition of `atoms` with `model` (path `backfill`)."""
    if model not in config.models:
        raise ConfigError(
            f"replay: unknown model {model!r} (configured: {', '.join(config.models)})"
        )
    await prepare_topics(config)
    async with Admin(config.kafka) as admin:
        count = await admin.partition_count(config.topics.atoms)
    if count is None:
        raise ConfigError(f"replay: topic {config.topics.atoms} does not exist")
    topic = config.topics.atoms
    partitions = list(range(count))
    result = ReplayResult()
    async with PartitionReader(config.kafka) as reader, OutputProducer(config.kafka) as producer:
        log_starts = await reader.beginning_offsets(topic, partitions)
        log_ends = await reader.end_offsets(topic, partitions)
        starts = await _resolve(reader, config, from_offsets, from_time, log_starts)
        ends = await _resolve(reader, config, to_offsets, to_time, log_ends)
        total = sum(max(ends[p] - starts[p], 0) for p in partitions)
        models = ModelPool(config)
        async with ControlPlane(config) as control:  # weights the log knows under this name
            await control.replay()
        recorded = dict(control.state.fingerprints)
        models.check_against(recorded.get)
        stats = ProcessorStats()
        inference = Inference(config.batching, stats, Sensor())
        processor = WindowProcessor(config, models, producer, inference, stats)
        await models.get(model)
        began = time.monotonic()
        for partition in partitions:
            newer = await _keys(reader, config, partition, ends[partition], log_ends[partition])
            async for records in reader.chunks(
                topic,
                partition,
                starts[partition],
                ends[partition],
                max_records=config.batching.window_atoms,
            ):
                keep = []
                for record in records:
                    atom_id = _atom_id(record, config)
                    if atom_id is None:
                        result.skipped_invalid += 1
                    elif atom_id in newer:
                        result.skipped_newer += 1
                    else:
                        keep.append(record)
                if keep:
                    await processor.process(keep, (model,), None, path="backfill")
                result.events += len(records)
                result.embedded += len(keep)
                if show_progress:
                    line = progress_line(result.events, total, time.monotonic() - began)
                    sys.stderr.write(f"\r{line}")
        if show_progress:
            sys.stderr.write("\n")
    return result


async def _resolve(
    reader: PartitionReader,
    config: Config,
    offsets: dict[int, int] | None,
    at: datetime | None,
    default: dict[int, int],
) -> dict[int, int]:
    """Offsets per partition from P:O pairs, a timestamp, or the default."""
    if offsets is not None:
        unknown = set(offsets) - set(default)
        if unknown:
            raise ConfigError(f"replay: no partition {sorted(unknown)} in {config.topics.atoms}")
        return {p: offsets.get(p, default[p]) for p in default}
    if at is not None:
        topic, partitions = config.topics.atoms, list(default)
        found = await reader.offsets_for_time(topic, partitions, int(at.timestamp() * 1000))
        ends = await reader.end_offsets(topic, partitions)
        resolved = {}
        for partition in partitions:
            offset = found.get(partition)
            resolved[partition] = ends[partition] if offset is None else offset
        return resolved
    return dict(default)


async def _keys(
    reader: PartitionReader, config: Config, partition: int, start: int, end: int
) -> set[str]:
    """Atom ids with an event in [start, end): they have versions newer than the range."""
    return {
        atom_id
        async for chunk in reader.chunks(config.topics.atoms, partition, start, end)
        for record in chunk
        if (atom_id := _atom_id(record, config)) is not None
    }


def _atom_id(record: SourceRecord, config: Config) -> str | None:
    try:
        return decode_atom(
            record.key, record.value, max_event_bytes=config.limits.max_event_bytes
        ).atom_id
    except InvalidAtom:
        return None
