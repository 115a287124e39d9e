"""What the processor reports while it runs: counters, and one sensor interface.

`ProcessorStats` holds the counters (the one source for logs, progress and /metrics). A
`Sensor` hears of events as they happen (metrics histograms, the bench, tests); the
processor is given one sensor at start-up, and `Sensors` fans events out to several.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from stream.processor.stages import StageClock


class Sensor:
    """Events of a running processor; every method is a no-op unless overridden.

    Methods run on the event loop and must not block.
    """

    def on_listening(self, port: int | None) -> None:
        """The HTTP endpoint is bound to `port` (None: it could not bind)."""

    def on_assigned(self, partitions: Sequence[int]) -> None:
        """The consumer group assigned these partitions of `atoms` to this instance."""

    def on_commit(self, offsets: Mapping[int, int]) -> None:
        """Offsets {partition: next offset} were committed after their outputs were acked."""

    def on_batch(self, model: str, atoms: int, seconds: float) -> None:
        """One model call over `atoms` atoms took `seconds`."""

    def on_window(self, seconds: float) -> None:
        """One live window was processed and committed in `seconds`."""

    def on_backfill_step(self, seconds: float) -> None:
        """One backfill (or replay) step ran for `seconds`: what a live window waited."""

    def on_broker(self, reachable: bool) -> None:
        """Kafka became unreachable (calls are being retried), or reachable again."""


class Sensors(Sensor):
    """Several sensors as one: each event reaches each of them, in order."""

    def __init__(self, *sensors: Sensor) -> None:
        self._sensors = sensors

    def _each(self, event: str, *args: object) -> None:
        for sensor in self._sensors:
            getattr(sensor, event)(*args)

    def on_listening(self, port: int | None) -> None:
        self._each("on_listening", port)

    def on_assigned(self, partitions: Sequence[int]) -> None:
        self._each("on_assigned", partitions)

    def on_commit(self, offsets: Mapping[int, int]) -> None:
        self._each("on_commit", offsets)

    def on_batch(self, model: str, atoms: int, seconds: float) -> None:
        self._each("on_batch", model, atoms, seconds)

    def on_window(self, seconds: float) -> None:
        self._each("on_window", seconds)

    def on_backfill_step(self, seconds: float) -> None:
        self._each("on_backfill_step", seconds)

    def on_broker(self, reachable: bool) -> None:
        self._each("on_broker", reachable)


@dataclass
class ProcessorStats:
    """Counters of the processor since it started."""

    atoms_in: Counter[str] = field(default_factory=Counter)  # by path: live, backfill
    outputs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, path)
    tombstones: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)  # by stage, all of them
    model_dead_letters: Counter[tuple[str, str]] = field(default_factory=Counter)  # (model, stage)
    dead_letters_reduced: int = 0  # refused by the broker, written again reduced
    dead_letters_lost: int = 0  # refused even reduced: given up on, logged
    truncated: Counter[str] = field(default_factory=Counter)
    embed_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    backfilled_events: int = 0
    stages: StageClock | None = None  # the bench's per-stage clocks; None (off) otherwise
