"""The `--workers` supervisor: defaults, each worker's environment, and its handling of
signals and exits, with small Python processes standing in for processors."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from stream.config import Config, MetricsConfig, RuntimeConfig
from stream.ops import workers as workers_module
from stream.ops.workers import Supervisor, default_workers, worker_environment

pytestmark = pytest.mark.timeout(60)

CPU = Config()
GPU = msgspec.structs.replace(CPU, runtime=RuntimeConfig(device="cuda:0"))


def test_one_worker_on_a_cpu_and_one_per_two_cores_up_to_four_on_a_gpu() -> None:
    assert default_workers(CPU, cpus=16) == 1
    assert [default_workers(GPU, cpus=n) for n in (1, 2, 6, 16)] == [1, 1, 3, 4]


def test_each_worker_gets_its_client_id_metrics_port_and_share_of_the_cores() -> None:
    env = worker_environment(CPU, 2, 4, {"PATH": "/bin"}, cpus=8)
    assert env == {
        "PATH": "/bin",
        "LATTICE_KAFKA_CLIENT_ID": "lattice-embed-w2",
        "LATTICE_METRICS_PORT": "9402",
        "LATTICE_RUNTIME_TORCH_THREADS": "2",
    }
    any_port = msgspec.structs.replace(GPU, metrics=MetricsConfig(port=0))
    assert worker_environment(any_port, 1, 4, {}, cpus=8) == {
        "LATTICE_KAFKA_CLIENT_ID": "lattice-embed-w1"
    }, "port 0: each picks a free one; on a GPU torch keeps its own thread count"
    static = msgspec.structs.replace(
        any_port, kafka=msgspec.structs.replace(any_port.kafka, group_instance_id="pod-3")
    )
    assert worker_environment(static, 1, 4, {}, cpus=8) == {
        "LATTICE_KAFKA_CLIENT_ID": "lattice-embed-w1",
        "LATTICE_KAFKA_GROUP_INSTANCE_ID": "pod-3-w1",
    }, "static members: each worker is its own member, stable across restarts"


# A stand-in processor: writes its pid, exits 0 on SIGTERM, or `EXIT` when set (once
# `AFTER` stand-ins have written theirs, if set: a loaded host starts them slowly).
WORKER = """
import os, signal, sys, time
from pathlib import Path
Path(sys.argv[1], str(os.getpid())).write_text(os.environ["LATTICE_KAFKA_CLIENT_ID"])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while len(os.listdir(sys.argv[1])) < int(os.environ.get("AFTER", "0")):
    time.sleep(0.05)
if os.environ.get("EXIT"):
    sys.exit(int(os.environ["EXIT"]))
while True:
    time.sleep(0.05)
"""


def started(directory: Path, count: int, within: float = 20) -> set[int]:
    """The pids of the stand-ins once `count` have written theirs (polled: nothing to await
    across processes)."""
    deadline = time.monotonic() + within
    while len(pids := {int(p.name) for p in directory.iterdir()}) < count:
        assert time.monotonic() < deadline, f"{len(pids)} of {count} workers started"
        time.sleep(0.05)
    return pids


def supervise(tmp_path: Path, count: int) -> tuple[Supervisor, list[int]]:
    """A supervisor of `count` stand-ins, run on a thread; its status lands in the list."""
    command = [sys.executable, "-c", WORKER, str(tmp_path)]
    supervisor = Supervisor(CPU, command, count)
    status: list[int] = []
    threading.Thread(target=lambda: status.append(supervisor.run()), daemon=True).start()
    return supervisor, status


def finished(status: list[int], within: float = 20) -> int:
    deadline = time.monotonic() + within
    while not status:
        assert time.monotonic() < deadline, "the supervisor is still running"
        time.sleep(0.05)
    return status[0]


@pytest.fixture(autouse=True)
def _no_signal_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Signal handlers can only be set on the main thread: these tests signal by hand."""
    monkeypatch.setattr(workers_module, "_PASSED_ON", ())


def test_a_killed_worker_is_restarted_and_sigterm_stops_every_worker_with_zero(
    tmp_path: Path,
) -> None:
    supervisor, status = supervise(tmp_path, 2)
    first = started(tmp_path, 2)
    victim = min(first)
    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    after = started(tmp_path, 3)
    names = {(tmp_path / str(pid)).read_text() for pid in after}
    assert names == {"lattice-embed-w0", "lattice-embed-w1"}, "the restart keeps its index"
    supervisor._on_signal(signal.SIGTERM, None)
    assert finished(status) == 0


def test_a_fatal_exit_stops_the_others_and_is_the_supervisor_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        workers_module,
        "worker_environment",
        lambda config, index, count, base: {
            **base,
            "LATTICE_KAFKA_CLIENT_ID": f"w{index}",
            **({"EXIT": "1", "AFTER": "2"} if index == 1 else {}),
        },
    )
    _, status = supervise(tmp_path, 2)
    assert finished(status) == 1
    assert len(started(tmp_path, 2)) == 2


def test_a_worker_that_keeps_dying_stops_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        workers_module,
        "worker_environment",
        lambda config, index, count, base: {**base, "LATTICE_KAFKA_CLIENT_ID": "w", "EXIT": "3"},
    )
    _, status = supervise(tmp_path, 1)
    assert finished(status) == 3
    assert len(started(tmp_path, workers_module.RESTARTS + 1)) == workers_module.RESTARTS + 1
