"""The live path on the real broker: outputs, dead letters, tombstones."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest

from schemas.embeddings import EmbeddingRecord, decode_embedding
from stream.config import OutputConfig
from stream.embed.embedder import Embedder
from stream.tools.corpus import sample_texts
from tests.support.kafka import (
    atom_value,
    collect,
    create_topic,
    delete_value,
    latest_by_key,
    produce,
    unique,
)
from tests.support.processor import processor

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "embed_parity_v1"
DLQ_HEADERS = {
    "lattice.dlq.topic",
    "lattice.dlq.partition",
    "lattice.dlq.offset",
    "lattice.dlq.stage",
    "lattice.dlq.error-class",
    "lattice.dlq.error",
}


def keys(n: int) -> Callable[[list[Any]], bool]:
    """Done when `n` distinct keys have arrived."""
    return lambda records: len({r.key for r in records}) >= n


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_500_atoms_reach_minilm_and_match_reference_vectors(
    bootstrap: str, make_config: Any
) -> None:
    fixtures = json.loads((FIXTURES / "all_minilm_l6_v2.json").read_text())
    texts = [f["input"] for f in fixtures] + sample_texts(495)
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=3)
    config, _ = make_config(atoms, models={"minilm": None}, stable="minilm")
    await produce(
        bootstrap,
        atoms,
        ((f"a-{i}".encode(), atom_value(f"a-{i}", t)) for i, t in enumerate(texts)),
    )
    async with processor(config):
        out = await collect(bootstrap, config.topics.embeddings("minilm"), keys(500), within=240)
    latest = latest_by_key(out)
    assert set(latest) == {f"a-{i}" for i in range(500)}
    for i, fixture in enumerate(fixtures):
        record = msgspec.json.decode(latest[f"a-{i}"].value, type=EmbeddingRecord)
        assert record.dim == 384 and record.model == "minilm" and record.path == "live"
        diff = np.abs(np.array(record.vector, dtype=np.float32) - np.array(fixture["embedding"]))
        assert diff.max() < 1e-5, f"fixture {i}: max diff {diff.max()}"


@pytest.mark.timeout(120)
async def test_every_class_of_bad_input_becomes_one_dead_letter(
    bootstrap: str, make_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms)
    config, _ = make_config(atoms, extra="[limits]\nmax_event_bytes = 2048\n")
    long_id = "x" * 513
    bad: list[tuple[str, bytes | None, bytes | None]] = [
        ("decode", b"k1", b"\xff\xfe not utf-8"),
        ("decode", b"k2", b"{not json"),
        ("decode", b"k3", b"[1, 2, 3]"),
        ("decode", b"k4", atom_value("k4", "y" * 4000)),
        ("decode", b"\xff", None),
        ("validate", b"k5", b'{"type": "atom.created", "atom_id": "k5"}'),
        ("validate", b"k6", b'{"type": "atom.created", "atom_id": "k6", "text": 7}'),
        ("validate", b"k7", atom_value("k7", "   \n\t ")),
        ("validate", b"k8", b'{"type": "atom.exploded", "atom_id": "k8"}'),
        ("validate", b"k9", atom_value("other", "key differs from atom_id")),
        ("validate", b"k10", atom_value("k10", "naive time", created_at="2026-11-27T10:00:00")),
        ("validate", long_id.encode(), atom_value(long_id, "atom id too long")),
        ("validate", b"k11", atom_value("k11", "bad metadata", metadata={"a": 1})),
        ("validate", b"", atom_value("", "empty id")),
    ]
    good = [(f"g-{i}".encode(), atom_value(f"g-{i}", f"good atom number {i}")) for i in range(20)]
    stream: list[tuple[bytes | None, bytes | None]] = []
    for i, (_, key, value) in enumerate(bad):
        stream.extend([good[i], (key, value)])
    stream.extend(good[len(bad) :])
    await produce(
        bootstrap, atoms, stream, headers=[("lattice.dlq.stage", b"stale"), ("trace", b"t1")]
    )
    async with processor(config) as running:
        dlq = await collect(bootstrap, config.topics.dlq, lambda r: len(r) >= len(bad), within=90)
        out = await collect(bootstrap, config.topics.embeddings("tiny"), keys(20), within=60)
    assert {r.key for r in out} == {k for k, _ in good}
    assert len(dlq) == len(bad)
    by_offset = {int(dict(r.headers)["lattice.dlq.offset"]): r for r in dlq}
    assert sorted(by_offset) == [2 * i + 1 for i in range(len(bad))]
    for i, (stage, key, value) in enumerate(bad):
        letter = by_offset[2 * i + 1]
        headers = dict(letter.headers)
        names = [name for name, _ in letter.headers]
        assert set(names) >= DLQ_HEADERS
        assert names.count("lattice.dlq.stage") == 1, "old dlq headers are replaced"
        assert headers["trace"] == b"t1"
        assert headers["lattice.dlq.stage"].decode() == stage, headers["lattice.dlq.error"]
        assert headers["lattice.dlq.topic"].decode() == atoms
        assert headers["lattice.dlq.partition"] == b"0"
        assert headers["lattice.dlq.error"] and headers["lattice.dlq.error-class"]
        assert (letter.key, letter.value) == (key, value)
    assert sum(running.stats.dead_letters.values()) == len(bad)


@pytest.mark.timeout(120)
async def test_deletes_and_null_values_become_tombstones_with_headers(
    bootstrap: str, make_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms)
    config, _ = make_config(atoms)
    await produce(
        bootstrap,
        atoms,
        [
            (b"a", atom_value("a", "first version")),
            (b"b", atom_value("b", "will be deleted")),
            (b"a", atom_value("a", "second version")),
            (b"b", delete_value("b")),
            (b"c", atom_value("c", "deleted by a compaction tombstone")),
            (b"c", None),
            (None, atom_value("d", "null key is fine")),
        ],
    )
    async with processor(config):
        out = await collect(
            bootstrap, config.topics.embeddings("tiny"), lambda r: len(r) >= 7, within=60
        )
    latest = latest_by_key(out)
    assert latest["b"].value is None and latest["c"].value is None
    tombstone_headers = dict(latest["b"].headers)
    assert tombstone_headers.pop("lattice.model-fingerprint").startswith(b"sha256:")
    assert tombstone_headers == {
        "lattice.model": b"tiny",
        "lattice.source-offset": f"{atoms}/0/3".encode(),
    }
    record = msgspec.json.decode(latest["a"].value, type=EmbeddingRecord)
    assert record.source.offset == 2, "the update is the last record for its key"
    assert dict(latest["d"].headers)["lattice.source-offset"] == f"{atoms}/0/6".encode()
    assert [r.key for r in out] == [b"a", b"b", b"a", b"b", b"c", b"c", b"d"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("encoding", "width", "atol"), [("msgpack", 4, 1e-5), ("msgpack-f16", 2, 1e-3)]
)
async def test_msgpack_values_with_zstd_carry_the_same_vectors(
    bootstrap: str, make_config: Any, encoding: str, width: int, atol: float
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms)
    config, _ = make_config(atoms)
    config = msgspec.structs.replace(
        config,
        kafka=msgspec.structs.replace(config.kafka, compression_type="zstd"),
        output=OutputConfig(encoding=encoding),  # type: ignore[arg-type]
    )
    texts = sample_texts(30)
    await produce(
        bootstrap,
        atoms,
        ((f"m-{i}".encode(), atom_value(f"m-{i}", t)) for i, t in enumerate(texts)),
    )
    async with processor(config):
        out = await collect(bootstrap, config.topics.embeddings("tiny"), keys(30), within=60)
    expected = await anyio.to_thread.run_sync(
        lambda: Embedder("tiny", config.models["tiny"]).embed(texts)
    )
    for record in out:
        headers = dict(record.headers)
        assert headers["lattice.encoding"] == encoding.encode()
        decoded = decode_embedding(record.value, encoding)
        # packed bytes plus the fields (the fingerprint is ~80 bytes), not JSON numbers
        assert len(record.value) < width * decoded.dim + 300, "packed bytes, not JSON numbers"
        index = int(decoded.atom_id.removeprefix("m-"))
        assert decoded.source.offset == index and decoded.model == "tiny"
        np.testing.assert_allclose(decoded.vector, expected[index], atol=atol)
