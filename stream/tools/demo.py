"""`lattice-embed demo`: local broker, sample atoms, live embedding with MiniLM, example queries."""

from __future__ import annotations

import logging
import sys
import time
import uuid

import anyio
import msgspec
import numpy as np

from schemas.embeddings import ENCODING_HEADER, decode_embedding
from stream.config import Config, with_run_topics
from stream.core.records import OutRecord
from stream.embed.pool import ModelPool
from stream.kafka.admin import Admin, TopicSpec
from stream.kafka.producer import OutputProducer
from stream.kafka.reader import PartitionReader
from stream.ops.progress import progress_line
from stream.processor.app import run_processor
from stream.tools.corpus import sample_texts
from stream.tools.localbroker import local_bootstrap, start_local_broker, stop_local_broker

QUERIES = (
    "compress data to make files smaller",
    "send an email message to a mail server",
    "pick random numbers",
    "run another program and read its output",
    "split text into lines that fit a width",
)


def run_demo(config: Config, *, atoms: int, keep_broker: bool) -> int:
    """Run the whole demo; returns the exit status."""
    # The demo's screen is the progress bar and the answers; keep client chatter off it.
    logging.getLogger("stream").setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if not (started := start_local_broker(_print)):
        _print("using the local Kafka broker that is already running")
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    demo_config = with_run_topics(config, f"demo-{run_id}", bootstrap=local_bootstrap())
    metrics = msgspec.structs.replace(demo_config.metrics, port=0)  # any free port
    demo_config = msgspec.structs.replace(demo_config, metrics=metrics)
    try:
        anyio.run(_demo, demo_config, atoms)
    finally:
        if started and not keep_broker:
            _print("stopping the local broker")
            stop_local_broker()
    return 0


async def _demo(config: Config, count: int) -> None:
    texts = sample_texts(count)
    model = config.routing.stable_model
    output_topic = config.topics.embeddings(model)
    async with Admin(config.kafka) as admin:
        await admin.ensure_topics([TopicSpec(config.topics.atoms, 3, 1)])
    await _produce_atoms(config, texts)
    _print(f"produced {len(texts)} atoms to {config.topics.atoms}; embedding them with {model}")
    models = ModelPool(config)
    stop = anyio.Event()
    vectors: dict[str, np.ndarray] = {}
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(lambda: run_processor(config, stop=stop, models=models))
        await _watch_outputs(config, output_topic, len(texts), vectors)
        stop.set()
    _print(f"all {len(vectors)} atoms are on {output_topic}; the processor drained and stopped")
    embedder = await models.get(model)
    ids = sorted(vectors)
    matrix = np.vstack([vectors[i] for i in ids])
    text_of = {f"doc-{i}": text for i, text in enumerate(texts)}
    for query in QUERIES:
        scores = matrix @ embedder.embed([query], query=True)[0]
        print(f'\nquery: "{query}"')
        for rank in np.argsort(-scores)[:3]:
            text = text_of[ids[rank]]
            print(f"  {scores[rank]:.3f}  {text[:110]}{'...' if len(text) > 110 else ''}")


async def _produce_atoms(config: Config, texts: list[str]) -> None:
    async with OutputProducer(config.kafka, linger_ms=10) as producer:
        for i, text in enumerate(texts):
            atom_id = f"doc-{i}"
            event = {"type": "atom.created", "atom_id": atom_id, "text": text}
            record = OutRecord(atom_id.encode(), msgspec.json.encode(event), [])
            await producer.send(config.topics.atoms, record)
        await producer.flush()


async def _watch_outputs(
    config: Config, topic: str, total: int, vectors: dict[str, np.ndarray]
) -> None:
    """Read the output topic as it fills and draw a progress bar until every atom is there."""
    started = time.monotonic()
    async with PartitionReader(config.kafka) as reader:
        async for records in reader.follow(topic):
            for message in records:
                if message.value is None:
                    continue
                encoding = dict(message.headers).get(ENCODING_HEADER, b"json").decode()
                record = decode_embedding(message.value, encoding)
                vectors[record.atom_id] = np.asarray(record.vector, dtype=np.float32)
            line = progress_line(len(vectors), total, time.monotonic() - started)
            sys.stderr.write(f"\r{line}")
            sys.stderr.flush()
            if len(vectors) >= total:
                break
    sys.stderr.write("\n")


def _print(message: str) -> None:
    print(f"demo: {message}", flush=True)
