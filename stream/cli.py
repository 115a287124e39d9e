"""The `lattice-embed` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

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
        help="which work this instance does (default: all)",
    )

    status = commands.add_parser("status", parents=[common], help="show the current routing")
    status.add_argument("--json", action="store_true", help="print the RoutingStatus as JSON")

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
        _setup_logging(config)
        if args.command == "run":
            from stream.app import run_processor

            anyio.run(lambda: run_processor(config))
            return 0
        if args.command == "status":
            return _status(config, as_json=args.json)
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


def _status(config: Config, *, as_json: bool) -> int:
    from stream.app import read_status

    status = anyio.run(read_status, config)
    if as_json:
        print(msgspec.json.encode(status).decode())
    else:
        print(f"phase:        {status.phase}")
        print(f"query model:  {status.query_model}")
        print(f"write models: {', '.join(status.write_models)}")
        if status.migration_id:
            print(f"migration:    {status.migration_id} ({status.state})")
    return 0


def _setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.runtime.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.root.level))


if __name__ == "__main__":
    sys.exit(main())
