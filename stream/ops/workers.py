"""`lattice-embed run --workers N`: N processor processes of one consumer group on one machine.

Each worker is a whole processor (its own consumer, producer, tokenizer and model replica),
started as `lattice-embed run --workers 1` with the same configuration. The consumer group is
the engine: partitions spread over the workers as over separate machines, so per-partition
order, exactly-once and the migration's guarantees hold unchanged, and a partition's on-disk
state is reopened by whichever local worker owns it next (the state store's `StateBusy`).

The supervisor only starts, signals and restarts processes:
- SIGTERM / SIGINT go to every worker, which drains and commits; the supervisor exits 0 once
  all have exited 0. SIGUSR1 is passed on (each worker logs its task stacks).
- A worker that exits unasked (crash, kill, OOM) is restarted, at most `RESTARTS` times in
  `RESTART_PERIOD_SECS`; past that, or when a worker exits 1 or 2 (a fatal error or a bad
  configuration, which a restart cannot fix), the others are stopped and the supervisor exits
  with that status.
- Per worker: `kafka.client_id` gets `-w<i>`, the metrics port is `port + i` (each picks a free
  one when the port is 0), and on a CPU `runtime.torch_threads` defaults to the usable cores
  (affinity, capped by a container's CPU quota) / N.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType

from stream.config import Config
from stream.embed.cores import usable_cores

log = logging.getLogger(__name__)

RESTARTS = 5  # unasked exits tolerated per worker within the period below
RESTART_PERIOD_SECS = 300.0
FATAL_EXITS = (1, 2)  # LatticeError and ConfigError: the same start would fail again
MAX_AUTO_GPU_WORKERS = 4
POLL_SECS = 0.2  # how often the supervisor looks for exited workers
_PR_SET_PDEATHSIG = 1


def default_workers(config: Config, cpus: int | None = None) -> int:
    """1 on a CPU (one process already keeps every core busy in the model); on a GPU, one
    worker per two cores up to 4: the device is shared and each worker's Python (decode,
    tokenize, produce) needs a core of its own."""
    if not config.runtime.device.startswith("cuda"):
        return 1
    return max(1, min(MAX_AUTO_GPU_WORKERS, (cpus or usable_cores()) // 2))


def worker_environment(
    config: Config, index: int, workers: int, base: dict[str, str], cpus: int | None = None
) -> dict[str, str]:
    """The environment of worker `index`: the supervisor's, plus its own client id (and
    static group instance id, when set), metrics port and (on a CPU, unless set) its share
    of the cores for torch."""
    env = dict(base)
    env["LATTICE_KAFKA_CLIENT_ID"] = f"{config.kafka.client_id}-w{index}"
    if config.kafka.group_instance_id is not None:  # static members: one id per worker
        env["LATTICE_KAFKA_GROUP_INSTANCE_ID"] = f"{config.kafka.group_instance_id}-w{index}"
    if config.metrics.enabled and config.metrics.port != 0:
        env["LATTICE_METRICS_PORT"] = str(config.metrics.port + index)
    if config.runtime.torch_threads is None and not config.runtime.device.startswith("cuda"):
        env["LATTICE_RUNTIME_TORCH_THREADS"] = str(max(1, (cpus or usable_cores()) // workers))
    return env


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    exits: deque[float] = field(default_factory=deque)  # times of unasked exits


class Supervisor:
    """Starts the workers, passes signals on, restarts what dies unasked."""

    def __init__(self, config: Config, command: list[str], workers: int) -> None:
        """`command`: how to start one worker (`lattice-embed run --workers 1 ...`)."""
        self._config = config
        self._command = command
        self._count = workers
        self._workers: dict[int, _Worker] = {}  # by pid
        self._stopping = False
        self._stop_signal: int = signal.SIGTERM
        self._status = 0

    def run(self) -> int:
        """Run until every worker has exited; the exit status for the supervisor."""
        previous = {s: signal.signal(s, self._on_signal) for s in _PASSED_ON}
        try:
            for index in range(self._count):
                self._start(index, deque())
            log.info("started %d workers (pids %s)", self._count, sorted(self._workers))
            while self._workers:
                for pid, worker in list(self._workers.items()):
                    code = worker.process.poll()
                    if code is not None:
                        del self._workers[pid]
                        self._exited(worker, code)
                time.sleep(POLL_SECS)  # signals run their handlers during it
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._signal_all(signal.SIGKILL)  # only if `run` itself failed midway
        return self._status

    def _start(self, index: int, exits: deque[float]) -> None:
        env = worker_environment(self._config, index, self._count, dict(os.environ))
        process = subprocess.Popen(self._command, env=env, preexec_fn=_die_with_parent)
        self._workers[process.pid] = _Worker(index, process, exits)

    def _exited(self, worker: _Worker, code: int) -> None:
        status = 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + N
        if self._stopping:
            if code == -self._stop_signal:  # still starting: no handler yet, nothing to drain
                log.info("worker %d stopped before it had started", worker.index)
            elif status != 0:
                log.warning("worker %d exited with status %d while stopping", worker.index, status)
                self._status = self._status or status
            return
        now = time.monotonic()
        worker.exits.append(now)
        while worker.exits and worker.exits[0] < now - RESTART_PERIOD_SECS:
            worker.exits.popleft()
        if status in FATAL_EXITS or len(worker.exits) > RESTARTS:
            why = "a fatal error" if status in FATAL_EXITS else f"{RESTARTS} restarts"
            log.error(
                "worker %d exited with status %d (%s): stopping every worker",
                worker.index,
                status,
                why,
            )
            self._status = status or 1
            self._stop()
            return
        log.warning("worker %d exited with status %d unasked: restarting it", worker.index, status)
        self._start(worker.index, worker.exits)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGUSR1:
            self._signal_all(signum)
            return
        if not self._stopping:
            log.info("received %s: draining every worker", signal.Signals(signum).name)
        self._stop(signum)

    def _stop(self, signum: int = signal.SIGTERM) -> None:
        if not self._stopping:
            self._stopping = True
            self._stop_signal = signum
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for worker in self._workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signum)


_PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies (Linux), so a killed
    supervisor leaves no orphaned workers holding partitions."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_workers(config: Config, *, workers: int, role: str, config_path: str | None) -> int:
    """Run `workers` processor processes under one supervisor; their combined exit status."""
    command = [sys.executable, "-m", "stream.ops.cli", "run", "--workers", "1", "--role", role]
    if config_path is not None:
        command += ["--config", config_path]
    return Supervisor(config, command, workers).run()
