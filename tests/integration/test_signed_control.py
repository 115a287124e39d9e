"""A control log that only trusted writers steer (issue 11 item 4), on the real broker:
processors sign their internal events, the operator signs commands, and an unsigned record
from anyone else with write access is rejected with its reason and changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from schemas.control import BackfillProgress, StartMigration
from schemas.routing import RoutingPhase
from stream.ops.operator import send_command
from stream.processor.app import read_status
from tests.integration.test_migration import (
    PARTITIONS,
    History,
    assert_model_matches_atoms,
    phase_is,
    start,
)
from tests.integration.test_migration_load import quarter_load
from tests.support.kafka import create_topic, end_offsets, produce, unique
from tests.support.processor import processor, wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

BACKLOG = 400


def signing(tmp_path: Path) -> str:
    """The `[control]` settings of a processor: signatures required, it signs as proc-1."""
    for key_id in ("proc-1", "ops-1"):
        (tmp_path / key_id).write_text(f"{key_id}-secret-of-at-least-16-bytes\n")
    return f"""
[control]
require_signatures = true
signing_key = "proc-1"
processor_keys = ["proc-1"]
operator_keys = ["ops-1"]
[control.key_files]
proc-1 = "{tmp_path / "proc-1"}"
ops-1 = "{tmp_path / "ops-1"}"
"""


@pytest.mark.timeout(240)
async def test_only_signed_commands_and_events_steer_a_migration(
    bootstrap: str, make_config: Any, tiny_model: Path, tiny_model_b: Path, tmp_path: Path
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = make_config(
        atoms,
        models={"tiny": tiny_model, "tinyb": tiny_model_b},
        extra="[batching]\nwindow_atoms = 32\n" + signing(tmp_path),
    )
    operator = msgspec.structs.replace(
        config, control=msgspec.structs.replace(config.control, signing_key="ops-1")
    )
    history = History(seed=41)
    await produce(bootstrap, atoms, history.events(BACKLOG, churn=0.3))
    async with processor(config) as running:
        load, capacity = await quarter_load(bootstrap, running, atoms, history, BACKLOG)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(load.run)
            # Anyone with write access but no operator key: refused, nothing starts.
            unsigned = StartMigration(migration_id="m0", source_model="tiny", target_model="tinyb")
            await produce(
                bootstrap, config.topics.control, [(b"routing", msgspec.json.encode(unsigned))]
            )
            refused = await read_status(config)
            assert refused.phase == "stable" and refused.last_rejection is not None
            assert refused.last_rejection.reason == "unsigned (signatures are required)"
            # A processor's key cannot issue commands either.
            accepted, status = await send_command(config, start("m1", rollback_window_secs=3600))
            assert not accepted and status.last_rejection is not None
            assert "not an accepted operator key" in status.last_rejection.reason
            accepted, _ = await send_command(operator, start("m1", rollback_window_secs=3600))
            assert accepted
            # A forged "backfill is done" for every partition: rejected, no early cutover.
            forged = [
                (
                    b"routing",
                    msgspec.json.encode(
                        BackfillProgress(migration_id="m1", partition=p, offset=10**9)
                    ),
                )
                for p in range(PARTITIONS)
            ]
            await produce(bootstrap, config.topics.control, forged)
            during = await read_status(config)
            assert during.last_rejection is not None
            assert during.last_rejection.command == "backfill_progress"
            state = await wait_for_routing(
                config, phase_is(RoutingPhase.ROLLBACK_WINDOW), within=180
            )
            load.stop()
        await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS))
    assert state.migration is not None and state.migration.progress.total is not None
    await assert_model_matches_atoms(bootstrap, config, atoms, "tinyb")
    print(
        f"\nsigned control: capacity {capacity:.0f} atoms/s, load {load.rate:.0f}/s, "
        f"{load.produced} events; 1 unsigned command, 1 processor-signed command and "
        f"{PARTITIONS} forged progress records rejected; the migration completed"
    )
