"""Benchmark results: the measured rates, the per-workload summary, the table and the plot."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Rate:
    """One throughput measurement."""

    atoms: int
    seconds: float
    tokens: int = 0
    padded_tokens: int = 0

    @property
    def atoms_per_sec(self) -> float:
        return self.atoms / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


@dataclass
class WorkloadResult:
    """Medians over the runs of one workload."""

    name: str
    mean_tokens: float
    model_only: float = 0.0
    embedder: float = 0.0
    end_to_end: float = 0.0
    tokens_per_sec: float = 0.0
    padding_model_only: float = 0.0
    padding_embedder: float = 0.0
    offered_rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p99_bound_ms: float = 0.0  # 2 x max wait + one micro-batch's compute at the embedder rate
    runs: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.end_to_end / self.model_only if self.model_only else 0.0


def median(values: list[float]) -> float:
    """The median, 0 for no values."""
    return statistics.median(values) if values else 0.0


def write_report(report: dict[str, Any], results: Sequence[WorkloadResult], out: Path) -> None:
    """bench.json and bench.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    _plot(results, out / "bench.png")


def _plot(results: Sequence[WorkloadResult], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [r.name for r in results]
    x = np.arange(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for offset, (label, key) in enumerate(
        (("model only", "model_only"), ("embedder", "embedder"), ("end to end", "end_to_end"))
    ):
        left.bar(x + (offset - 1) * 0.27, [getattr(r, key) for r in results], 0.27, label=label)
    left.set_xticks(x, names)
    left.set_ylabel("atoms/s")
    left.set_title("throughput by workload")
    left.legend()
    right.bar(x - 0.2, [r.p50_ms for r in results], 0.4, label="p50")
    right.bar(x + 0.2, [r.p99_ms for r in results], 0.4, label="p99")
    right.set_xticks(x, names)
    right.set_ylabel("ms")
    right.set_title("latency at half the sustainable load")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain table."""
    lines = [
        f"model {report['model']} on {report['device']}, {report['atoms']} atoms, "
        f"median of {report['runs']} run(s)",
        f"{'workload':9} {'tokens':>6} {'model':>8} {'embedder':>9} {'e2e':>8} {'e2e/model':>9} "
        f"{'tok/s':>8} {'pad(a)':>6} {'pad(b)':>6} {'load':>6} {'p50ms':>7} {'p99ms':>7} "
        f"{'bound':>6}",
    ]
    for w in report["workloads"]:
        lines.append(
            f"{w['name']:9} {w['mean_tokens']:6.0f} {w['model_only']:8.1f} {w['embedder']:9.1f} "
            f"{w['end_to_end']:8.1f} {w['ratio_end_to_end_vs_model_only']:9.2f} "
            f"{w['tokens_per_sec']:8.0f} {w['padding_model_only']:6.2f} "
            f"{w['padding_embedder']:6.2f} {w['offered_rate']:6.1f} {w['p50_ms']:7.0f} "
            f"{w['p99_ms']:7.0f} {w['p99_bound_ms']:6.0f}"
        )
    if "backfill_latency" in report:
        b = report["backfill_latency"]
        lines.append(
            f"live at {b['live_rate']:.1f} atoms/s: p99 idle {b['idle_p99_ms']:.0f} ms, under "
            f"backfill {b['busy_p99_ms']:.0f} ms (x{b['p99_ratio']:.2f}); backfill "
            f"{b['backfill_atoms_per_sec']:.1f} atoms/s ({b['backfill_done']:.0f}/"
            f"{b['backfill_total']:.0f} meanwhile)"
        )
    if "backfill_share" in report:
        b = report["backfill_share"]
        lines.append(
            f"backfill share: capacity {b['capacity_atoms_per_sec']:.0f} atoms/s (runs spread "
            f"{b.get('capacity_spread', 0.0):.0%}), live "
            f"{b['live_rate']:.0f} atoms/s dual-written; backfill embedding "
            f"{b.get('emit_atoms_per_sec', 0.0):.0f} atoms/s = {b['share_ratio']:.2f} x the "
            f"spare {b['spare_atoms_per_sec']:.0f} over the second half of the load "
            f"({b['share_ratio_overall']:.2f} x over all of it, the keys pass included); "
            f"live p99 {b['busy_p99_ms']:.0f} ms under "
            f"backfill (idle {b['idle_p99_ms']:.0f} ms, bound {b['p99_bound_ms']:.0f} ms); "
            f"live windows took {b.get('live_busy_fraction', 0.0):.0%} of the time (a live "
            f"atom cost {b.get('live_cost_ratio', 0.0):.2f} backlog atoms, 2.00 at backlog "
            f"efficiency), and backfill ran at {b.get('share_of_time_left', 0.0):.2f} x the "
            f"capacity of the time left to it; backfill steps took "
            f"{b.get('step_p50_ms', 0.0):.0f}/{b.get('step_p99_ms', 0.0):.0f} ms p50/p99 "
            f"(budget {b.get('step_budget_ms', 0.0):.0f} ms)"
        )
    if "memory" in report:
        m = report["memory"]
        lines.append(
            f"memory, {m['atoms']:.0f}-atom backlog in {m['seconds']:.0f}s: peak RSS "
            f"{m['peak_rss_mib']:.0f} MiB, idle with model {m['baseline_rss_mib']:.0f} MiB "
            f"(growth {m['growth_mib']:.0f} MiB), model {m['model_mib']:.0f} MiB"
        )
    if "work" in report:
        w = report["work"]
        lines.append(
            f"work: {w['events']:.0f} events over {w['keys']:.0f} keys, {w['live_keys']:.0f} "
            f"live: the target embedded {w['target_embeds']:.0f} for backfill "
            f"({w['embeds_per_live_key']:.3f} per live key) in {w['secs']:.0f}s; G2 missing "
            f"{w['g2_missing']:.0f}, G4 stale {w['g4_stale']:.0f}, vectors "
            f"{'ok' if w['vectors_ok'] else 'DIFFER'} ({w['vectors_checked']:.0f} checked)"
        )
    if "scale" in report:
        c = report["scale"]
        rss = ", ".join(
            f"instance {i}: idle {c[f'instance{i}_idle_rss_mib']:.0f} MiB, peak "
            f"{c[f'instance{i}_peak_rss_mib']:.0f} MiB (+{c[f'instance{i}_growth_mib']:.0f})"
            for i in (0, 1)
        )
        lines.append(
            f"scale: {c['events']:.0f} events over {c['keys']:.0f} keys, live "
            f"{c['live_rate']:.0f} atoms/s ({c['live_events']:.0f} events); migration "
            f"{c['migration_secs']:.0f}s, {c['backfill_total']:.0f} to embed; killed at "
            f"{c.get('killed_at_fraction', 0) * 100:.0f}%, resumed in {c['resume_secs']:.1f}s; "
            f"{rss}; G2 missing {c['g2_missing']:.0f}, G4 stale {c['g4_stale']:.0f}, vectors "
            f"{'ok' if c['vectors_ok'] else 'DIFFER'}"
        )
    if "dual_write" in report:
        d = report["dual_write"]
        lines.append(
            f"dual-write {'+'.join(d['models'])}: {d['atoms_per_sec']:.1f} atoms/s, "
            f"ideal {d['ideal_atoms_per_sec']:.1f}, ratio {d['ratio']:.2f}"
        )
    if "exactly_once" in report:
        e = report["exactly_once"]
        lines.append(
            f"exactly once ({e['workload']}, {e['atoms']} atoms): "
            f"{e['exactly_once_atoms_per_sec']:.1f} atoms/s against at least once "
            f"{e['at_least_once_atoms_per_sec']:.1f}, ratio {e['ratio']:.2f}"
        )
    if "control_log" in report:
        lines += control_log_lines(report["control_log"])
    if "pipeline" in report:
        from stream.tools.benchpipeline import pipeline_lines

        lines += pipeline_lines(report["pipeline"])
    if "workers_scaling" in report:
        from stream.tools.benchworkers import scaling_lines

        lines += scaling_lines(report["workers_scaling"])
    if "serve" in report:
        from stream.serve.bench import format_serve_table

        s = report["serve"]
        lines.append(
            f"embeddings API ({s['model']}, {s['input_type']} texts, one per request, loopback):"
        )
        lines.append(format_serve_table(s))
    return "\n".join(lines)


def control_log_lines(c: dict[str, Any]) -> list[str]:
    """The control-log replay measurement: cold start-up replays before and after."""
    lines = [
        f"control log, simulated {c['hours']:g} h migration over {c['partitions']} partitions "
        f"(cold start-up replay; snapshot every {c['snapshot_every']} records):",
        f"{'checkpoints':>12} {'records':>10} {'full replay':>12} {'rec/s':>8} "
        f"{'snapshot+tail':>14} {'tail':>6}",
    ]
    for name in ("before", "after"):
        run = c[name]
        full, snap = run["full_replay"], run["snapshot_replay"]
        lines.append(
            f"{'every ' + format(c['checkpoint_secs'][name], 'g') + ' s':>12} "
            f"{run['records']:>10,} {full['seconds']:>11.1f}s "
            f"{full['records_folded'] / full['seconds']:>8,.0f} "
            f"{snap['seconds']:>13.2f}s {snap['records_folded']:>6,}"
        )
    return lines
