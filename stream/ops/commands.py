"""What each one-shot subcommand does once its arguments are parsed."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import anyio
import msgspec

from stream.config import Config
from stream.errors import ConfigError


def bench(config: Config, args: argparse.Namespace) -> int:
    """`lattice-embed bench`: run the benchmarks, print the table, write the report."""
    from pathlib import Path

    from stream.tools.bench import ScaleOptions, run_bench
    from stream.tools.benchreport import format_table
    from stream.tools.workloads import WORKLOADS

    workloads = [w for w in args.workloads.split(",") if w and w != "none"]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        raise ConfigError(f"bench: unknown workload(s) {sorted(unknown)}; use {WORKLOADS}")
    if args.device:
        runtime = msgspec.structs.replace(config.runtime, device=args.device)
        config = msgspec.structs.replace(config, runtime=runtime)
    started = False
    if args.local_broker:
        from stream.tools.localbroker import local_bootstrap, start_local_broker

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
                backfill_share_target=args.backfill_share,
                memory_atoms=args.memory,
                scale=ScaleOptions(
                    config_path=args.config or os.environ.get("LATTICE_CONFIG"),
                    scale_target=args.scale,
                    scale_events=args.scale_events,
                    scale_keys=args.scale_keys,
                    scale_static=args.scale_static,
                    work_target=args.work,
                    work_events=args.work_events,
                    work_keys=args.work_keys,
                ),
                serve_levels=(1, 16, 64) if args.serve else None,
                serve_requests=args.serve_requests,
                serve_secs=args.serve_secs,
                control_log=(args.control_partitions, args.control_hours)
                if args.control_log
                else None,
                exactly_once_atoms=args.eos_atoms if args.exactly_once else None,
                pipeline_atoms=args.pipeline_atoms if args.pipeline else None,
                workers_levels=args.workers_scaling,
                workers_atoms=args.workers_atoms,
            )
        )
    finally:
        if started:
            from stream.tools.localbroker import stop_local_broker

            stop_local_broker()
    print(format_table(report))
    print(f"wrote {args.out}/bench.json and {args.out}/bench.png")
    return 0


def replay(config: Config, args: argparse.Namespace) -> int:
    """`lattice-embed replay`: re-embed a range of `atoms` into one model's topic."""
    from datetime import datetime

    from schemas.routing import ReplayState
    from stream.ops.replay import parse_offsets, replay

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
    from_offsets = parse_offsets(args.from_offset) if args.from_offset else None
    from_time = when(args.from_timestamp) if args.from_timestamp else None
    try:
        result = anyio.run(
            lambda: replay(
                config,
                args.model,
                from_offsets=from_offsets,
                from_time=from_time,
                to_offsets=to_offsets,
                to_time=to_time,
                replay_id=args.replay_id,
                detach=args.detach,
            )
        )
    except KeyboardInterrupt:
        print(
            "lattice-embed: replay: stopped following; the replay continues in the processors "
            "(`status` shows it; `control cancel-replay` stops it)",
            file=sys.stderr,
        )
        raise
    done = result.replay
    if done.state is ReplayState.IN_PROGRESS:
        print(f"replay {done.replay_id} requested: {done.events} events into {result.topic}")
        return 0
    if not result.succeeded:
        print(
            f"lattice-embed: replay {done.replay_id} {done.state}: {done.reason}", file=sys.stderr
        )
        return 1
    print(
        f"replay {done.replay_id} completed: {done.events} events into {result.topic}, "
        f"{done.progress.processed} embedded (latest versions only; superseded, deleted, "
        "invalid and since-updated atoms cost no model time)"
    )
    return 0


def _dry_run(config: Config, source: str, target: str) -> int:
    from stream.ops.operator import dry_run

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


def control(config: Config, args: argparse.Namespace) -> int:
    """`lattice-embed control ...`: append a command and report its outcome."""
    from schemas import control as commands
    from stream.ops.operator import send_command

    command: commands.ControlCommand
    issued_by = os.environ.get("USER")
    if args.action == "start-migration":
        source = args.source
        if source is None:
            from stream.processor.app import read_status

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
    elif args.action == "cancel-replay":
        command = commands.CancelReplay(replay_id=args.replay_id, issued_by=issued_by)
    else:
        kinds: dict[str, type[commands.MigrationCommand]] = {
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


def status(config: Config, *, as_json: bool, watch: bool) -> int:
    """`lattice-embed status`: the routing rebuilt from the control log."""
    from stream.processor.app import read_status

    if watch:
        from stream.ops.operator import watch_status

        anyio.run(watch_status, config)
        return 0
    routing = anyio.run(read_status, config)
    if as_json:
        print(msgspec.json.encode(routing).decode())
    else:
        print(f"phase:        {routing.phase}")
        print(f"query model:  {routing.query_model}")
        print(f"write models: {', '.join(routing.write_models)}")
        if routing.migration_id:
            print(f"migration:    {routing.migration_id} ({routing.state})")
        if routing.progress is not None:
            total = "unknown" if routing.progress.total is None else routing.progress.total
            print(f"backfill:     {routing.progress.processed}/{total}")
        for replay in routing.replays or ():
            total = "unknown" if replay.progress.total is None else replay.progress.total
            print(
                f"replay:       {replay.replay_id} into {replay.model} ({replay.state}): "
                f"{replay.progress.processed}/{total} of {replay.events} events"
            )
        if routing.rollback_window_ends_at is not None:
            print(f"rollback window ends at {routing.rollback_window_ends_at.isoformat()}")
        if routing.last_rejection is not None:
            rejection = routing.last_rejection
            print(
                f"last rejection: {rejection.command} {rejection.migration_id}: {rejection.reason}"
            )
    return 0
