"""Model fingerprints on the real broker: on every output, in the control log, and a start
with changed weights under the same model name refused with one line."""

from __future__ import annotations

import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from schemas.control import ModelFingerprint
from schemas.embeddings import decode_embedding
from stream.embed.fingerprint import model_fingerprint
from stream.processor.app import read_status
from tests.support.kafka import (
    atom_value,
    collect,
    create_topic,
    delete_value,
    produce,
    read_all,
    unique,
)
from tests.support.models import build_tiny_bert
from tests.support.processor import processor

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


def fingerprint_records(records: list[Any]) -> list[ModelFingerprint]:
    """The model_fingerprint events of a control log."""
    events = []
    for record in records:
        decoded = msgspec.json.decode(record.value)
        if decoded.get("command") == "model_fingerprint":
            events.append(msgspec.json.decode(record.value, type=ModelFingerprint))
    return events


@pytest.mark.timeout(300)
async def test_outputs_carry_the_fingerprint_and_changed_weights_refuse_the_start(
    bootstrap: str, make_config: Any, tiny_model: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "tiny"
    shutil.copytree(tiny_model, model_dir)
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms)
    config, path = make_config(atoms, models={"tiny": model_dir})
    topic = config.topics.embeddings("tiny")
    fingerprint = await anyio.to_thread.run_sync(
        model_fingerprint, model_dir, config.models["tiny"]
    )
    await produce(
        bootstrap,
        atoms,
        [
            (
                b"a-0",
                atom_value(
                    "a-0",
                    "with metadata",
                    metadata={"tenant": "t1"},
                    created_at="2026-11-27T10:00:00Z",
                ),
            ),
            (b"a-1", atom_value("a-1", "plain")),
            (b"a-1", delete_value("a-1")),
        ],
    )
    async with processor(config):
        out = await collect(bootstrap, topic, lambda r: len(r) >= 3, within=120)
    assert [r.key for r in out] == [b"a-0", b"a-1", b"a-1"]
    for record in out:  # tombstones too
        assert dict(record.headers)["lattice.model-fingerprint"] == fingerprint.encode()
    with_metadata, plain = (decode_embedding(r.value) for r in out[:2])
    assert out[2].value is None
    assert with_metadata.model_fingerprint == plain.model_fingerprint == fingerprint
    assert with_metadata.metadata == {"tenant": "t1"}
    assert with_metadata.created_at == datetime(2026, 11, 27, 10, tzinfo=UTC)
    assert (plain.metadata, plain.created_at) == (None, None)
    recorded = (await read_status(config)).fingerprints
    assert recorded is not None and recorded["tiny"] == fingerprint
    assert set(recorded) == set(config.models), "every configured model (the bundled one too)"

    # A restart with the same weights starts, writes, and records nothing new.
    await produce(bootstrap, atoms, [(b"a-2", atom_value("a-2", "after the restart"))])
    async with processor(config):
        out = await collect(bootstrap, topic, lambda r: b"a-2" in {x.key for x in r}, within=120)
    assert decode_embedding(out[-1].value).model_fingerprint == fingerprint
    control = await read_all(bootstrap, config.topics.control)
    assert [e for e in fingerprint_records(control) if e.model == "tiny"] == [
        ModelFingerprint(model="tiny", fingerprint=fingerprint)
    ]
    assert len(fingerprint_records(control)) == len(config.models), "one record per model"

    # New weights under the same name: `lattice-embed run` refuses with one line.
    await anyio.to_thread.run_sync(lambda: build_tiny_bert(model_dir, seed=7))
    changed = await anyio.to_thread.run_sync(model_fingerprint, model_dir, config.models["tiny"])
    assert changed != fingerprint
    with anyio.fail_after(180):
        refused = await anyio.run_process(
            [sys.executable, "-m", "stream.ops.cli", "run", "--config", str(path)], check=False
        )
    assert refused.returncode == 1, refused.stderr.decode(errors="replace")[-3000:]
    assert refused.stderr.decode().strip().splitlines()[-1] == (
        f"lattice-embed: error: model tiny: its weights/settings changed (fingerprint {changed}, "
        f"the control log has {fingerprint}); new weights under an old name need a migration "
        "to a new model name, not a restart"
    )
    assert len(await read_all(bootstrap, topic)) == len(out), "it wrote nothing"
    control = await read_all(bootstrap, config.topics.control)
    assert [e for e in fingerprint_records(control) if e.model == "tiny"] == [
        ModelFingerprint(model="tiny", fingerprint=fingerprint)
    ]
    assert len(fingerprint_records(control)) == len(config.models), "one record per model"
