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

import anyio
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.atoms import InvalidAtom, decode_atom
from stream.config import Config
from stream.core.deadletter import SourceRecord
from stream.embed.pool import ModelPool
from stream.errors import ConfigError
from stream.kafka.admin import Admin
from stream.kafka.clients import kafka_errors, make_consumer, make_producer
from stream.ops.progress import progress_line
from stream.processor.app import prepare_topics
from stream.processor.window import LiveStats, WindowProcessor, to_source_record


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
        partitions = await admin.partition_count(config.topics.atoms)
    if partitions is None:
        raise ConfigError(f"replay: topic {config.topics.atoms} does not exist")
    reader = make_consumer(config.kafka, group_id=None, fetch_max_wait_ms=10)
    producer = make_producer(config.kafka)
    result = ReplayResult()
    async with kafka_errors("replay", config.kafka.bootstrap_servers):
        await reader.start()
        await producer.start()
    try:
        tps = [TopicPartition(config.topics.atoms, p) for p in range(partitions)]
        log_ends = {tp: int(o) for tp, o in (await reader.end_offsets(tps)).items()}
        starts = await _resolve(reader, tps, from_offsets, from_time, default=None)
        ends = await _resolve(reader, tps, to_offsets, to_time, default=log_ends)
        total = sum(max(ends[tp] - starts[tp], 0) for tp in tps)
        models = ModelPool(config)

        async def send(topic, key, value, headers, timestamp_ms):  # type: ignore[no-untyped-def]
            return await producer.send(
                topic, value=value, key=key, headers=headers, timestamp_ms=timestamp_ms
            )

        processor = WindowProcessor(config, models, send, LiveStats())
        await models.get(model)
        began = time.monotonic()
        for tp in tps:
            newer = await _keys(reader, tp, ends[tp], log_ends[tp], config)
            offset = starts[tp]
            while offset < ends[tp]:
                batch_end = min(offset + config.batching.window_atoms, ends[tp])
                records = await _read(reader, tp, offset, batch_end)
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
                result.events += batch_end - offset
                result.embedded += len(keep)
                offset = batch_end
                if show_progress:
                    line = progress_line(result.events, total, time.monotonic() - began)
                    sys.stderr.write(f"\r{line}")
        if show_progress:
            sys.stderr.write("\n")
    finally:
        with anyio.CancelScope(shield=True):
            await reader.stop()
            await producer.stop()
    return result


async def _resolve(
    reader: AIOKafkaConsumer,
    tps: list[TopicPartition],
    offsets: dict[int, int] | None,
    at: datetime | None,
    *,
    default: dict[TopicPartition, int] | None,
) -> dict[TopicPartition, int]:
    """Offsets per partition from P:O pairs, a timestamp, or the default (log start)."""
    if offsets is not None:
        unknown = set(offsets) - {tp.partition for tp in tps}
        if unknown:
            raise ConfigError(f"replay: no partition {sorted(unknown)} in {tps[0].topic}")
        base = default or {tp: int(o) for tp, o in (await reader.beginning_offsets(tps)).items()}
        return {tp: offsets.get(tp.partition, base[tp]) for tp in tps}
    if at is not None:
        found = await reader.offsets_for_times({tp: int(at.timestamp() * 1000) for tp in tps})
        ends = await reader.end_offsets(tps)
        return {tp: int(found[tp].offset) if found.get(tp) else int(ends[tp]) for tp in tps}
    if default is not None:
        return dict(default)
    return {tp: int(o) for tp, o in (await reader.beginning_offsets(tps)).items()}


async def _read(
    reader: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int
) -> list[SourceRecord]:
    reader.assign([tp])
    reader.seek(tp, start)
    records: list[SourceRecord] = []
    while await reader.position(tp) < end:
        for message in (await reader.getmany(tp, timeout_ms=1000)).get(tp, []):
            if message.offset < end:
                records.append(to_source_record(message))
    return records


async def _keys(
    reader: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int, config: Config
) -> set[str]:
    """Atom ids with an event in [start, end): they have versions newer than the range."""
    return {
        atom_id
        for record in await _read(reader, tp, start, end)
        if (atom_id := _atom_id(record, config)) is not None
    }


def _atom_id(record: SourceRecord, config: Config) -> str | None:
    try:
        return decode_atom(
            record.key, record.value, max_event_bytes=config.limits.max_event_bytes
        ).atom_id
    except InvalidAtom:
        return None
