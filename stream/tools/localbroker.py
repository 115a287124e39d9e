"""The repository's local Kafka broker (deploy/kafka/local-kafka), for the demo and bench."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from stream.errors import BrokerUnavailable

LOCAL_KAFKA = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "local-kafka"


def local_bootstrap() -> str:
    """Where the local broker listens."""
    return f"127.0.0.1:{os.environ.get('KAFKA_PORT', '9092')}"


def start_local_broker(say: object = print) -> bool:
    """Start the local broker unless it runs already; True when this call started it."""
    if not LOCAL_KAFKA.exists():
        raise BrokerUnavailable(f"{LOCAL_KAFKA} is missing (run from a source checkout)")
    if subprocess.run([str(LOCAL_KAFKA), "status"], capture_output=True).returncode == 0:
        return False
    if callable(say):
        say("starting a local Kafka broker (first run resolves its jars from Maven Central)")
    if subprocess.run([str(LOCAL_KAFKA), "start"], check=False).returncode != 0:
        raise BrokerUnavailable(f"{LOCAL_KAFKA} start failed (see its output above)")
    return True


def stop_local_broker() -> None:
    """Stop the local broker."""
    subprocess.run([str(LOCAL_KAFKA), "stop"], check=False, stdout=subprocess.DEVNULL)
