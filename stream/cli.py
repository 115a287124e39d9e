"""The `lattice-embed` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

import anyio
import msgspec

from stream import __version__
from stream.config import Config, load_config
from stream.errors import ConfigError, LatticeError


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

    run = commands.add_parser(
        "run", parents=[common], help="run the processor (SIGTERM drains, commits and exits 0)"
    )
    run.add_argument(
        "--role",
        choices=("all", "live", "backfill"),
        default="all",
        help="all (default): live path plus backfill of the partitions it owns; live: live path "
        "and handoffs only, backfill left to instances with role all; backfill: same as all "
        "(backfill runs in the live owner of each partition, so per-key order is exact)",
    )

    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="the embeddings API (OpenAI-compatible /v1/embeddings) that follows the routing",
    )
    serve.add_argument("--host", help="listen address (default: serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: serve.port, 8080)")

    commands.add_parser(
        "sink",
        parents=[common],
        help="keep one pgvector table per model current from the embeddings topics",
    )

    status = commands.add_parser("status", parents=[common], help="show the current routing")
    status.add_argument("--json", action="store_true", help="print the RoutingStatus as JSON")
    status.add_argument(
        "--watch", action="store_true", help="keep showing phase, models and backfill progress"
    )

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

    replay = commands.add_parser(
        "replay",
        parents=[common],
        help="re-embed a range of the atoms topic into one model's topic (safe while running)",
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

    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="measure model-only and end-to-end throughput (and latency) in one run",
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
    bench.add_argument("--device", help="cpu or cuda (default: runtime.device)")
    bench.add_argument("--out", default="bench-results", help="folder for bench.json/.png")
    bench.add_argument(
        "--local-broker",
        action="store_true",
        help="start the repository's local broker (and use it) if it is not running",
    )

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="start a local broker, embed sample atoms with MiniLM, answer example queries",
    )
    demo.add_argument("--atoms", type=int, default=300, help="how many sample atoms (default 300)")
    demo.add_argument(
        "--keep-broker", action="store_true", help="leave the local broker running afterwards"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        _setup_logging(config, quiet=args.command not in ("run", "serve", "sink"))
        if args.command == "run":
            from stream.app import run_processor

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
            return _status(config, as_json=args.json, watch=args.watch)
        if args.command == "control":
            return _control(config, args)
        if args.command == "replay":
            return _replay(config, args)
        if args.command == "bench":
            return _bench(config, args)
        if args.command == "demo":
            from stream.demo import run_demo

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


def _bench(config: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from stream.bench import run_bench
    from stream.benchreport import format_table
    from stream.workloads import WORKLOADS

    workloads = [w for w in args.workloads.split(",") if w and w != "none"]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        raise ConfigError(f"bench: unknown workload(s) {sorted(unknown)}; use {WORKLOADS}")
    if args.device:
        runtime = msgspec.structs.replace(config.runtime, device=args.device)
        config = msgspec.structs.replace(config, runtime=runtime)
    started = False
    if args.local_broker:
        from stream.localbroker import local_bootstrap, start_local_broker

        started = start_local_broker()
        kafka = msgspec.structs.replace(config.kafka, bootstrap_servers=local_bootstrap())
        config = msgspec.structs.replace(config, kafka=kafka)
    logging.getLogger("stream").setLevel(logging.WARNING)
    try:
        report = anyio.run(
            lambda: run_bench(
                config,
                workloads=workloads,
                atoms=args.atoms,
                runs=args.runs,
                dual=args.dual,
                load_secs=args.load_secs,
                out=Path(args.out),
                backfill_target=args.backfill_latency,
                backfill_live_rate=args.live_rate,
                memory_atoms=args.memory,
            )
        )
    finally:
        if started:
            from stream.localbroker import stop_local_broker

            stop_local_broker()
    print(format_table(report))
    print(f"wrote {args.out}/bench.json and {args.out}/bench.png")
    return 0


def _replay(config: Config, args: argparse.Namespace) -> int:
    from datetime import datetime

    from stream.replay import parse_offsets, replay

    def when(text: str) -> datetime:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ConfigError(f"replay: {text!r} is not an RFC 3339 time") from exc
        if moment.tzinfo is None:
            raise ConfigError(f"replay: {text!r} needs a time zone")
        return moment

    to_offsets = to_time = None
    if args.to:
        if len(args.to) == 1 and ":" in args.to[0] and not args.to[0].split(":")[0].isdigit():
            to_time = when(args.to[0])
        else:
            to_offsets = parse_offsets(args.to)
    result = anyio.run(
        lambda: replay(
            config,
            args.model,
            from_offsets=parse_offsets(args.from_offset) if args.from_offset else None,
            from_time=when(args.from_timestamp) if args.from_timestamp else None,
            to_offsets=to_offsets,
            to_time=to_time,
        )
    )
    print(
        f"replayed {result.events} events into {config.topics.embeddings(args.model)}: "
        f"{result.embedded} embedded, {result.skipped_newer} skipped (newer version exists), "
        f"{result.skipped_invalid} invalid"
    )
    return 0


def _dry_run(config: Config, source: str, target: str) -> int:
    from stream.operator import dry_run

    report = anyio.run(dry_run, config, source, target)
    print(f"source {report.source}: dim {report.source_dim}")
    print(f"target {report.target}: dim {report.target_dim}")
    if report.source_dim != report.target_dim:
        print("dimensions differ: queries must switch index with the query model")
    print(f"events to backfill: {report.events} (atoms topic, all partitions)")
    print(f"target model: {report.target_atoms_per_sec:.1f} atoms/s on a sample of {report.sample}")
    if report.estimate_secs is not None:
        print(f"estimated backfill time: {report.estimate_secs:.0f}s (model time, one instance)")
    print("dry run: nothing was changed")
    return 0


def _control(config: Config, args: argparse.Namespace) -> int:
    from schemas import control as commands
    from stream.operator import send_command

    command: commands.ControlCommand
    issued_by = os.environ.get("USER")
    if args.action == "start-migration":
        source = args.source
        if source is None:
            from stream.app import read_status

            source = anyio.run(read_status, config).query_model
        if args.dry_run:
            return _dry_run(config, source, args.target)
        try:
            backfill = msgspec.convert(
                {
                    "batch_size": args.batch_size,
                    "max_concurrent": args.max_concurrent,
                    "dual_write": not args.no_dual_write,
                    "target_query_threshold": args.threshold,
                    "rollback_window_secs": args.rollback_window_secs,
                },
                commands.BackfillConfig,
            )
        except msgspec.ValidationError as exc:
            print(f"lattice-embed: control: invalid backfill settings: {exc}", file=sys.stderr)
            return 2
        command = commands.StartMigration(
            migration_id=args.migration_id,
            source_model=source,
            target_model=args.target,
            backfill=backfill,
            issued_by=issued_by,
        )
    else:
        kinds: dict[str, type[commands.ControlCommand]] = {
            "pause": commands.PauseMigration,
            "resume": commands.ResumeMigration,
            "cancel": commands.CancelMigration,
            "rollback": commands.Rollback,
            "finalize": commands.Finalize,
        }
        extra = {"reason": args.reason} if args.action == "pause" else {}
        command = kinds[args.action](migration_id=args.migration_id, issued_by=issued_by, **extra)
    accepted, status = anyio.run(send_command, config, command)
    if not accepted:
        reason = status.last_rejection.reason if status.last_rejection else "rejected"
        print(f"lattice-embed: control: rejected: {reason}", file=sys.stderr)
        return 1
    print(
        f"accepted: phase={status.phase} state={status.state} query={status.query_model} "
        f"write={','.join(status.write_models)}"
    )
    return 0


def _status(config: Config, *, as_json: bool, watch: bool) -> int:
    from stream.app import read_status

    if watch:
        from stream.operator import watch_status

        anyio.run(watch_status, config)
        return 0
    status = anyio.run(read_status, config)
    if as_json:
        print(msgspec.json.encode(status).decode())
    else:
        print(f"phase:        {status.phase}")
        print(f"query model:  {status.query_model}")
        print(f"write models: {', '.join(status.write_models)}")
        if status.migration_id:
            print(f"migration:    {status.migration_id} ({status.state})")
        if status.progress is not None:
            total = "unknown" if status.progress.total is None else status.progress.total
            print(f"backfill:     {status.progress.processed}/{total}")
        if status.rollback_window_ends_at is not None:
            print(f"rollback window ends at {status.rollback_window_ends_at.isoformat()}")
        if status.last_rejection is not None:
            rejection = status.last_rejection
            print(
                f"last rejection: {rejection.command} {rejection.migration_id}: {rejection.reason}"
            )
    return 0


class JsonLines(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record."""
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def _setup_logging(config: Config, *, quiet: bool) -> None:
    """The processor logs at the configured level; one-shot commands only warnings."""
    level = logging.getLevelName(config.runtime.log_level)
    handler = logging.StreamHandler(sys.stderr)
    if config.runtime.log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=max(level, logging.WARNING) if quiet else level, handlers=[handler])
    # aiokafka logs transient errors it retries itself; a one-shot command reports real
    # failures as one line from the exception instead.
    client_level = logging.CRITICAL if quiet else max(logging.WARNING, logging.root.level)
    logging.getLogger("aiokafka").setLevel(client_level)


if __name__ == "__main__":
    sys.exit(main())
