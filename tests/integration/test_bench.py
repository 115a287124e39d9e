"""`lattice-embed bench` runs end to end and writes well-formed numbers (not how fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support.kafka import unique

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


async def run_bench(*args: str) -> subprocess.CompletedProcess[bytes]:
    """`lattice-embed bench ARGS` as a child process (its output captured, any exit status)."""
    return await anyio.run_process(
        [sys.executable, "-m", "stream.ops.cli", "bench", *args], check=False
    )


@pytest.mark.timeout(240)
async def test_bench_writes_a_complete_report(migration_config: Any, tmp_path: Path) -> None:
    _, path = migration_config(unique("atoms"))
    out = tmp_path / "bench"
    done = await run_bench(
        "--config",
        str(path),
        "--workloads",
        "short,mixed",
        "--atoms",
        "24",
        "--runs",
        "2",
        "--load-secs",
        "2",
        "--dual",
        "tinyb",
        "--backfill-latency",
        "tinyb",
        "--live-rate",
        "20",
        "--memory",
        "300",
        "--pipeline",
        "--pipeline-atoms",
        "64",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert [w["name"] for w in report["workloads"]] == ["short", "mixed"]
    for workload in report["workloads"]:
        for key in ("model_only", "embedder", "end_to_end", "tokens_per_sec", "offered_rate"):
            assert workload[key] > 0, key
        assert len(workload["runs"]["end_to_end"]) == 2
        assert 0 <= workload["padding_embedder"] < 1
        assert 0 < workload["p50_ms"] <= workload["p99_ms"]
        ratio = workload["end_to_end"] / workload["model_only"]
        assert workload["ratio_end_to_end_vs_model_only"] == pytest.approx(ratio)
    assert report["dual_write"]["models"] == ["tiny", "tinyb"]
    assert report["dual_write"]["atoms_per_sec"] > 0
    latency = report["backfill_latency"]
    assert latency["idle_p99_ms"] > 0 and latency["busy_p99_ms"] > 0
    assert latency["p99_ratio"] == pytest.approx(latency["busy_p99_ms"] / latency["idle_p99_ms"])
    assert 0 <= latency["backfill_done"] <= latency["backfill_total"]
    # Live windows ran during the load, and took part of its time, not more than all of it.
    assert 0 < latency["live_busy_fraction"] <= 1.0
    assert latency["live_window_secs_per_atom"] > 0
    assert 0 < latency["step_p50_ms"] <= latency["step_p99_ms"]  # backfill steps ran
    memory = report["memory"]
    assert memory["atoms"] == 300 and memory["peak_rss_mib"] >= memory["baseline_rss_mib"] > 0
    assert memory["model_mib"] > 0
    pipeline = report["pipeline"]
    assert len(pipeline["runs"]["copy_loop"]) == len(pipeline["runs"]["zero_cost"]) == 2
    assert pipeline["ratio_zero_cost_vs_copy_loop"] == pytest.approx(
        pipeline["zero_cost_atoms_per_sec"] / pipeline["copy_loop_atoms_per_sec"]
    )
    for name, stages in pipeline["stages_us_per_atom"].items():
        timed = ("fetch", "decode", "tokenize", "device", "encode", "produce", "commit")
        assert all(stages[s] > 0 for s in timed), (name, stages)
        assert stages["loop_total"] >= stages["loop_rest"] >= 0
        assert stages["wall"] > stages["device"], "the device is one part of an atom's time"
        # The process's CPU time covers the loop's and the tokenizer's, on at most every core.
        assert stages["cpu"] > stages["loop_total"] + stages["tokenize"]
        assert 0 < stages["cores"] <= (os.cpu_count() or 1) + 0.5
    assert len(pipeline["runs"]["tokenizer"]) == 2
    assert pipeline["ratio_tokenizer_vs_copy_loop"] == pytest.approx(
        pipeline["tokenizer_atoms_per_sec"] / pipeline["copy_loop_atoms_per_sec"]
    )
    model, zero = (pipeline["stages_us_per_atom"][k]["device"] for k in ("model", "zero_cost"))
    assert zero < model, "the zero-cost model skips the forward pass"
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = done.stdout.decode()
    assert "e2e/model" in stdout and "bare copy loop" in stdout


@pytest.mark.timeout(180)
async def test_bench_serve_reports_each_concurrency_level(make_config: Any, tmp_path: Path) -> None:
    _, path = make_config(unique("atoms"))
    out = tmp_path / "bench"
    done = await run_bench(
        "--config",
        str(path),
        "--workloads",
        "none",
        "--serve",
        "--serve-requests",
        "32",
        "--serve-secs",
        "10",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    serve = json.loads((out / "bench.json").read_text())["serve"]
    assert serve["model"] == "tiny"
    assert [level["concurrency"] for level in serve["levels"]] == [1, 16, 64]
    for level in serve["levels"]:
        assert 0 < level["requests"] <= 32 and level["errors"] == 0, level
        assert level["requests_per_s"] > 0
        assert 0 < level["p50_ms"] <= level["p99_ms"]
    stdout = done.stdout.decode()
    assert "embeddings API" in stdout and "req/s" in stdout, stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_bench_workers_scaling_reports_each_worker_count(
    make_config: Any, tmp_path: Path
) -> None:
    _, path = make_config(unique("atoms"))
    out = tmp_path / "bench"
    done = await run_bench(
        "--config",
        str(path),
        "--workloads",
        "none",
        "--workers-scaling",
        "1,2",
        "--workers-atoms",
        "1500",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    scaling = json.loads((out / "bench.json").read_text())["workers_scaling"]
    assert scaling["partitions"] == 2 and scaling["atoms"] == 1500
    assert [level["workers"] for level in scaling["levels"]] == [1, 2]
    for level in scaling["levels"]:
        assert level["atoms_per_sec"] > 0 and level["produce_atoms_per_sec"] > 0, level
    assert scaling["levels"][0]["speedup"] == 1.0
    second = scaling["levels"][1]
    assert second["speedup"] == pytest.approx(
        second["atoms_per_sec"] / scaling["levels"][0]["atoms_per_sec"]
    )
    assert "workers scaling" in done.stdout.decode()
    log = (out / "workers" / "workers-2.log").read_text()
    assert "started 2 workers" in log and log.count("assigned partitions: [") >= 2, log[-2000:]
