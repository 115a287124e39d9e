"""Offered live load from a separate process, as client applications produce it.

A load generator inside the processor's process would share its event loop and its GIL with
the model thread: every produce call would then delay a model call, and the bench would
measure the generator as much as the processor. `offer_load` runs `produce_texts` in a child
process (`python -m stream.tools.loadgen`) with the run's Kafka settings and topic.
"""

from __future__ import annotations

import argparse
import os
import sys

import anyio

from stream.config import Config, load_config

ENV_BOOTSTRAP = "LATTICE_KAFKA_BOOTSTRAP_SERVERS"


async def offer_load(
    config: Config,
    config_path: str | None,
    *,
    workload: str,
    count: int,
    seed: int,
    rate: float,
    prefix: str,
) -> None:
    """Produce `count` texts of `workload` at `rate` atoms/s from a child process."""
    command = [sys.executable, "-m", "stream.tools.loadgen", "--workload", workload]
    command += ["--count", str(count), "--seed", str(seed), "--rate", str(rate)]
    command += ["--prefix", prefix]
    if config_path:
        command += ["--config", config_path]
    env = {
        **os.environ,
        ENV_BOOTSTRAP: config.kafka.bootstrap_servers,
        "LATTICE_TOPICS_ATOMS": config.topics.atoms,
    }
    result = await anyio.run_process(command, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"load generator failed: {result.stderr.decode(errors='replace')}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process."""
    from stream.tools.bench import produce_texts
    from stream.tools.workloads import workload_texts

    parser = argparse.ArgumentParser(prog="python -m stream.tools.loadgen")
    parser.add_argument("--config")
    parser.add_argument("--workload", default="mixed")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--prefix", default="load")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    texts = workload_texts(args.workload, args.count, seed=args.seed)
    anyio.run(lambda: produce_texts(config, texts, rate=args.rate, prefix=args.prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
