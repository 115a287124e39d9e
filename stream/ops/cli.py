"""The `lattice-embed` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from stream import __version__
from stream.config import load_config
from stream.errors import ConfigError, LatticeError
from stream.ops import commands
from stream.ops.logs import setup_logging
from stream.ops.workers import default_workers, run_workers


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("LATTICE_CONFIG"),
        help="TOML configuration file (default: $LATTICE_CONFIG, else built-in defaults); "
        "LATTICE_<SECTION>_<KEY> environment variables override it",
    )
    parser = argparse.ArgumentParser(
        prog="lattice-embed",
        description="Kafka stream processor that embeds atoms with every model in the write set "
        "and migrates between embedding models without losing an atom.",
    )
    parser.add_argument("--version", action="version", version=f"lattice-embed {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_run(commands, common)
    _add_serve(commands, common)
    _add_sink(commands, common)
    _add_status(commands, common)
    _add_control(commands, common)
    _add_replay(commands, common)
    _add_bench(commands, common)
    _add_demo(commands, common)
    return parser


def _levels(value: str) -> list[int]:
    """`--workers-scaling`: comma-separated positive worker counts."""
    try:
        levels = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of worker counts: {value!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"worker counts must be positive: {value!r}")
    return levels


def _workers(value: str) -> int | str:
    """`--workers`: a positive count, or `auto`."""
    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or auto, got {value!r}")
    return count


def _add_run(commands: Any, common: argparse.ArgumentParser) -> None:
    """`lattice-embed run`."""
    run = commands.add_parser(
        "run", parents=[common], help="run the processor (SIGTERM drains, commits and exits 0)"
    )
    run.add_argument(
        "--role",
        choices=("all", "backfill"),
        default="all",
        help="all (default; backfill is an alias): every instance runs the live path and the "
        "backfill of the partitions it owns (the live owner backfills, so per-key order is "
        "exact and a migration completes whatever instances run)",
    )
    run.add_argument(
        "--workers",
        type=_workers,
        default="auto",
        metavar="N",
        help="processes of one consumer group on this machine, each with its own clients and "
        "model replica, sharing the device (default auto: 1 on a CPU, one per two cores up "
        "to 4 on a GPU); SIGTERM drains them all; worker i serves metrics on port + i",
    )


def _add_serve(commands: Any, common: argparse.ArgumentParser) -> None:
    """`lattice-embed serve`."""
    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="the embeddings API (OpenAI-compatible /v1/embeddings) that follows the routing",
    )
    serve.add_argument("--host", help="listen address (default: serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: serve.port, 8080)")


def _add_sink(commands: Any, common: argparse.ArgumentParser) -> None:
    """`lattice-embed sink`."""
    commands.add_parser(
        "sink",
        parents=[common],
        help="keep one pgvector table per model current from the embeddings topics",
    )


def _add_status(commands: Any, common: argparse.ArgumentParser) -> None:
    """`lattice-embed status`."""
    status = commands.add_parser("status", parents=[common], help="show the current routing")
    status.add_argument("--json", action="store_true", help="print the RoutingStatus as JSON")
    status.add_argument(
        "--watch", action="store_true", help="keep showing phase, models and backfill progress"
    )


def _add_control(commands: Any, common: argparse.ArgumentParser) -> None:
    """`lattice-embed control`."""
    control = commands.add_parser(
        "control",
        help="change the routing: write a command to the control log and wait for its outcome "
        "(exit 0 accepted, 1 rejected with the reason on stderr)",
    )
    actions = control.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = actions.add_parser(
        "start-migration", parents=[common], help="dual-write, backfill, then cut over to a model"
    )
    start.add_argument("--migration-id", required=True)
    start.add_argument("--target", required=True, help="the model to migrate to")
    start.add_argument("--source", help="the model to migrate from (default: the stable model)")
    start.add_argument("--batch-size", type=int, default=100)
    start.add_argument("--max-concurrent", type=int, default=4)
    start.add_argument(
        "--no-dual-write", action="store_true", help="write new atoms to the source only"
    )
    start.add_argument("--threshold", type=float, default=0.8, help="target_query_threshold")
    start.add_argument("--rollback-window-secs", type=int, default=86400)
    start.add_argument(
        "--dry-run",
        action="store_true",
        help="load both models, count the events to backfill, estimate the duration from a "
        "measured sample, and change nothing",
    )
    cancel_replay = actions.add_parser(
        "cancel-replay",
        parents=[common],
        help="stop an unfinished replay (what it wrote stays: never older than the live path)",
    )
    cancel_replay.add_argument("--replay-id", required=True)
    for action, text in (
        ("pause", "pause backfill (dual-write continues)"),
        ("resume", "resume a paused or failed migration"),
        ("cancel", "cancel the migration: the source model alone again"),
        ("rollback", "inside the rollback window: back to the source model"),
        ("finalize", "inside the rollback window: write the target alone now"),
    ):
        sub = actions.add_parser(action, parents=[common], help=text)
        sub.add_argument("--migration-id", required=True)
        if action == "pause":
            sub.add_argument("--reason")


def _add_replay(commands: Any, common: argparse.ArgumentParser) -> None:
    """`lattice-embed replay`."""
    replay = commands.add_parser(
        "replay",
        parents=[common],
        help="re-embed a range of the atoms topic into one model's topic, run by the "
        "processors' partition owners (safe while they ingest)",
        description="Append a replay request to the control log and follow it until it is "
        "done (exit 0; 1 if it is rejected, cancelled or abandoned). The processors' "
        "partition owners run it between live windows with the backfill machinery: each "
        "key's latest version in the range is embedded once, unless a newer event follows "
        "(then that one is, or was, written live), so no old version lands after a newer "
        "one. Progress is kept in the control log: a processor restart or a rebalance "
        "resumes it. The model must be in the current write set. Nothing happens until a "
        "processor runs.",
    )
    replay.add_argument("--model", required=True, help="the model whose topic gets the records")
    start_at = replay.add_mutually_exclusive_group(required=True)
    start_at.add_argument(
        "--from-offset", nargs="+", metavar="P:O", help="start offsets (other partitions: start)"
    )
    start_at.add_argument("--from-timestamp", metavar="T", help="RFC 3339 start time")
    replay.add_argument(
        "--to",
        nargs="+",
        metavar="P:O|T",
        help="end (exclusive): offsets per partition, or an RFC 3339 time (default: log end now)",
    )
    replay.add_argument(
        "--replay-id",
        metavar="ID",
        help="name the replay (default: a fresh replay-<time>-<hex>); an existing id into the "
        "same model is followed again instead of requested twice",
    )
    replay.add_argument(
        "--detach",
        action="store_true",
        help="return once the request is accepted (follow it with `status` or --replay-id)",
    )


def _add_bench(commands: Any, common: argparse.ArgumentParser) -> None:
    """`lattice-embed bench`."""
    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="measure model-only and end-to-end throughput (and latency) in one run; "
        "--control-log: the control log's start-up replay before and after snapshots",
    )
    bench.add_argument(
        "--workloads", default="short,medium,long,mixed", help="comma-separated, or none"
    )
    bench.add_argument("--atoms", type=int, default=256, help="atoms per workload and run")
    bench.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    bench.add_argument("--dual", metavar="MODEL", help="also measure dual-write with MODEL")
    bench.add_argument("--load-secs", type=float, default=10.0, help="offered-load duration")
    bench.add_argument(
        "--backfill-latency",
        metavar="MODEL",
        help="also measure live p99 idle vs while a history (4 x --atoms) is backfilled to MODEL",
    )
    bench.add_argument(
        "--backfill-share",
        metavar="MODEL",
        help="also measure backfill's rate to MODEL against the spare capacity while live "
        "traffic (dual-written) uses half the capacity, and live p99 against its bound",
    )
    bench.add_argument(
        "--live-rate",
        type=float,
        default=5.0,
        help="offered live atoms/s for --backfill-latency (default 5)",
    )
    bench.add_argument(
        "--memory",
        type=int,
        metavar="ATOMS",
        help="also measure peak resident memory while draining a backlog of ATOMS",
    )
    bench.add_argument(
        "--scale",
        metavar="MODEL",
        help="also run a migration to MODEL over --scale-events atom events (3 partitions, two "
        "processes, one killed and restarted at 80%% progress, live traffic at a quarter of "
        "the capacity): idle and peak RSS of each process, resume time, G2/G4",
    )
    bench.add_argument(
        "--scale-events", type=int, default=1_000_000, help="events for --scale (1,000,000)"
    )
    bench.add_argument("--scale-keys", type=int, default=200_000, help="keys for --scale (200,000)")
    bench.add_argument(
        "--scale-static",
        action="store_true",
        help="--scale with static group members ([kafka] group_instance_id): the restarted "
        "process rejoins under its old id and takes its partitions back, with its state",
    )
    bench.add_argument(
        "--work",
        metavar="MODEL",
        help="also backfill an update-heavy log (--work-events over --work-keys, 10%% of the "
        "keys deleted) to MODEL: atoms the target embedded against the live keys",
    )
    bench.add_argument(
        "--work-events", type=int, default=100_000, help="events for --work (100,000)"
    )
    bench.add_argument("--work-keys", type=int, default=20_000, help="keys for --work (20,000)")
    bench.add_argument(
        "--serve",
        action="store_true",
        help="also measure the embeddings API (serve, in this process on a free loopback port): "
        "requests/s and p50/p99 with 1, 16 and 64 concurrent clients",
    )
    bench.add_argument(
        "--serve-requests",
        type=int,
        default=512,
        help="requests per --serve concurrency level (default 512)",
    )
    bench.add_argument(
        "--serve-secs",
        type=float,
        default=20.0,
        help="time limit per --serve concurrency level in seconds (default 20)",
    )
    bench.add_argument(
        "--control-log",
        action="store_true",
        help="also measure a cold start-up replay of the control log: a simulated migration "
        "(--control-partitions, --control-hours) with checkpoints once a second (v1) and at "
        "[backfill] checkpoint_interval_secs, each replayed in full and from a routing "
        "snapshot plus a tail of [control] snapshot_every - 1 records (needs no model)",
    )
    bench.add_argument(
        "--control-partitions",
        type=int,
        default=100,
        help="partitions of the simulated --control-log migration (default 100)",
    )
    bench.add_argument(
        "--control-hours",
        type=float,
        default=24.0,
        help="hours of backfill checkpoints in the simulated --control-log (default 24)",
    )
    bench.add_argument(
        "--exactly-once",
        action="store_true",
        help="also drain the same mixed backlog (--eos-atoms) at least once and exactly once "
        "(transactions), runs alternating: the throughput ratio of exactly-once",
    )
    bench.add_argument(
        "--eos-atoms", type=int, default=2048, help="atoms per --exactly-once run (2,048)"
    )
    bench.add_argument(
        "--pipeline",
        action="store_true",
        help="also measure the pipeline apart from the model on a mixed backlog "
        "(--pipeline-atoms): a bare aiokafka copy loop, the processor with a synthetic "
        "zero-cost model (tokenized, no forward pass) and with the model, runs alternating, "
        "with where each atom's time goes, stage by stage",
    )
    bench.add_argument(
        "--pipeline-atoms", type=int, default=4096, help="atoms per --pipeline run (4,096)"
    )
    bench.add_argument(
        "--workers-scaling",
        type=_levels,
        metavar="N,N,...",
        help="also drain a mixed backlog (--workers-atoms, over as many partitions as the "
        "largest N) with `run --workers N` for each N, e.g. 1,2,4,8: atoms/s and speed-up",
    )
    bench.add_argument(
        "--workers-atoms",
        type=int,
        default=20_000,
        help="atoms per --workers-scaling level (20,000)",
    )
    bench.add_argument("--device", help="cpu or cuda (default: runtime.device)")
    bench.add_argument("--out", default="bench-results", help="folder for bench.json/.png")
    bench.add_argument(
        "--local-broker",
        action="store_true",
        help="start the repository's local broker (and use it) if it is not running",
    )


def _add_demo(commands: Any, common: argparse.ArgumentParser) -> None:
    """`lattice-embed demo`."""
    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="start a local broker, ingest sample atoms into a pgvector sink, migrate to a "
        "second model while ingesting, and query through serve before the threshold, after it "
        "and after a rollback",
    )
    demo.add_argument("--atoms", type=int, default=200, help="how many sample atoms (default 200)")
    demo.add_argument(
        "--keep-broker", action="store_true", help="leave the local broker running afterwards"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        setup_logging(config, quiet=args.command not in ("run", "serve", "sink"))
        if args.command == "run":
            workers = default_workers(config) if args.workers == "auto" else args.workers
            if workers > 1:
                return run_workers(config, workers=workers, role=args.role, config_path=args.config)
            from stream.processor.app import run_processor

            anyio.run(lambda: run_processor(config, role=args.role))
            return 0
        if args.command == "serve":
            from stream.serve.cli import serve_until_signalled

            anyio.run(lambda: serve_until_signalled(config, host=args.host, port=args.port))
            return 0
        if args.command == "sink":
            from stream.sink.cli import sink_until_signalled

            anyio.run(lambda: sink_until_signalled(config))
            return 0
        if args.command == "status":
            return commands.status(config, as_json=args.json, watch=args.watch)
        if args.command == "control":
            return commands.control(config, args)
        if args.command == "replay":
            return commands.replay(config, args)
        if args.command == "bench":
            return commands.bench(config, args)
        if args.command == "demo":
            from stream.tools.demo import run_demo

            return run_demo(config, atoms=args.atoms, keep_broker=args.keep_broker)
    except ConfigError as exc:
        print(f"lattice-embed: {exc}", file=sys.stderr)
        return 2
    except LatticeError as exc:
        print(f"lattice-embed: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
