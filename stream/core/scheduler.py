"""Fair, work-conserving sharing of model time between live windows and backfill chunks.

The live owner of a partition runs both paths in one task, one step at a time: a live window,
or a backfill chunk. `ShareScheduler` decides which (it never reads a clock: `now` is always a
parameter, and it is fed what each step really cost):

- **They alternate while both have work.** After a live window, a backfill chunk of
  `chunk_secs`; after a chunk, the waiting live window. So a live window waits at most one
  chunk (live p99 grows by at most one chunk), and neither path starves.
- **Live drains once before the next chunk.** A live window after a chunk holds what
  arrived during the chunk; what arrives during that window would wait for a whole chunk and
  then a window as long. So when that window ran at least `drain_secs` (half a chunk) and
  the cap has room for that much more, one more live window runs first, holding what arrived
  meanwhile, and only what arrived during that shorter window waits a chunk. At half load
  (windows as long as chunks) that cuts the worst wait from about three chunks (window,
  chunk, window) to about two. Only once: a small window costs nearly as much as a larger
  one (per-window work, and small forward passes), so a chain of them until the cap took
  the time backfill's share is made of (measured: 3-7 live windows of 20-50 atoms between
  two chunks, live windows from 63-69 % of the time to 70-77 %).
- **Backfill gets at least `min_share`.** While backfill has work, a live window is capped at
  `live_cap_secs` (= `chunk_secs * (1 - min_share) / min_share`): the live path sizes its
  window to that budget (`chunk_atoms` from its measured rate), so a saturated live path
  takes at most `1 - min_share` of model time.
- **Work-conserving.** A path with nothing to do takes no turn: with no live record waiting,
  backfill runs chunk after chunk; with no backfill work, live windows run uncapped.
- **Steps big enough to be efficient.** Each turn is a whole quantum, never a sliver: a live
  window holds what arrived during the chunk before it, and a chunk is a full `chunk_secs`.
  (An earlier credit scheme ran a chunk as long as the credit the last live window earned;
  under steady live traffic that made both paths run in slivers of a few atoms whose fixed
  costs, produce acks, commits and per-call model overhead, ate most of the capacity.)

The chunk sizers turn a budget of seconds (a step's whole wall time: the live owner runs one
step at a time, so that is what the other path waits) into a number of records from a measured
rate (`RateEstimate`, an exponentially weighted mean of seconds per byte or per atom).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_MIN_SHARE = 0.25
DEFAULT_CHUNK_SECS = 0.2
DEFAULT_WINDOW_SECS = 10.0
DRAIN_FRACTION = 0.5  # a live window after a chunk this long or longer is followed by another


class Step(enum.Enum):
    """What the live owner should do next."""

    LIVE = "live"
    BACKFILL = "backfill"
    IDLE = "idle"


@dataclass(frozen=True, slots=True)
class Decision:
    """One scheduling decision.

    `budget_secs`: for BACKFILL, the seconds the chunk may take (size it with
    `chunk_atoms` or `chunk_prefix`); for LIVE, the longest window that still leaves backfill
    its share (`live_cap_secs`, less the live windows since the last chunk), or None when
    backfill has no work (no cap); None for IDLE.
    """

    step: Step
    budget_secs: float | None = None


class ShareScheduler:
    """Alternating quanta of model time: live never waits more than one chunk (and drains
    before the next), backfill gets at least `min_share` while it has work, and neither path
    idles the model."""

    def __init__(
        self,
        min_share: float = DEFAULT_MIN_SHARE,
        chunk_secs: float = DEFAULT_CHUNK_SECS,
        *,
        window_secs: float = DEFAULT_WINDOW_SECS,
    ) -> None:
        if not 0.0 < min_share < 1.0:
            raise ValueError(f"min_share must be in (0, 1), got {min_share}")
        if not chunk_secs > 0.0:
            raise ValueError(f"chunk_secs must be positive, got {chunk_secs}")
        if not window_secs > 0.0:
            raise ValueError(f"window_secs must be positive, got {window_secs}")
        self.min_share = min_share
        self.chunk_secs = chunk_secs
        self.drain_secs = chunk_secs * DRAIN_FRACTION
        self._last = Step.IDLE
        # Live seconds since the last chunk; None while no chunk ran since backfill had work.
        self._live_since_chunk: float | None = None
        self._live_windows_since_chunk = 0
        self._share = _DecayedShare(window_secs)

    @property
    def live_cap_secs(self) -> float:
        """The longest live window that leaves backfill `min_share` with one chunk after it."""
        return self.chunk_secs * (1.0 - self.min_share) / self.min_share

    def next_step(self, *, live_waiting: bool, backfill_pending: bool) -> Decision:
        """Decide the next step. Pure in the scheduler's state: call it, run the step,
        then report what the step cost with `record_live` or `record_backfill`."""
        if not backfill_pending:
            self._live_since_chunk = None
            return Decision(Step.LIVE) if live_waiting else Decision(Step.IDLE)
        if live_waiting and self._last is Step.BACKFILL:
            return Decision(Step.LIVE, self.live_cap_secs)
        since = self._live_since_chunk  # after one window, that window's seconds
        if live_waiting and since is not None and self._live_windows_since_chunk == 1:
            left = self.live_cap_secs - since
            if since >= self.drain_secs and left >= self.drain_secs:
                return Decision(Step.LIVE, left)  # drain once: see the module's docstring
        return Decision(Step.BACKFILL, self.chunk_secs)

    def record_live(self, seconds: float, now: float) -> None:
        """A live window took `seconds` of model time, ending at `now`."""
        seconds = _non_negative(seconds)
        self._last = Step.LIVE
        if self._live_since_chunk is not None:
            self._live_since_chunk += seconds
            self._live_windows_since_chunk += 1
        self._share.add(live=seconds, backfill=0.0, now=now)

    def record_backfill(self, seconds: float, now: float) -> None:
        """A backfill chunk took `seconds` of model time, ending at `now`."""
        self._last = Step.BACKFILL
        self._live_since_chunk = 0.0
        self._live_windows_since_chunk = 0
        self._share.add(live=0.0, backfill=_non_negative(seconds), now=now)

    def backfill_share(self, now: float) -> float | None:
        """Backfill's share of model time over the recent window (exponential decay with a
        half-life of `window_secs`), or None before any work was recorded."""
        return self._share.backfill_share(now)


class _DecayedShare:
    """Exponentially decayed model seconds of each path (for metrics and tests)."""

    def __init__(self, half_life_secs: float) -> None:
        self._half_life = half_life_secs
        self._live = 0.0
        self._backfill = 0.0
        self._at: float | None = None

    def _decay_to(self, now: float) -> None:
        if self._at is not None and now > self._at:
            factor = 0.5 ** ((now - self._at) / self._half_life)
            self._live *= factor
            self._backfill *= factor
        if self._at is None or now > self._at:
            self._at = now

    def add(self, *, live: float, backfill: float, now: float) -> None:
        self._decay_to(now)
        self._live += live
        self._backfill += backfill

    def backfill_share(self, now: float) -> float | None:
        self._decay_to(now)
        total = self._live + self._backfill
        if total <= 0.0:
            return None
        return self._backfill / total


class RateEstimate:
    """Exponentially weighted mean of model seconds per unit (a byte, or an atom)."""

    def __init__(self, initial_secs_per_unit: float, *, weight: float = 0.5) -> None:
        if not initial_secs_per_unit > 0.0:
            raise ValueError("the initial estimate must be positive")
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self._value = initial_secs_per_unit
        self._weight = weight

    @property
    def secs_per_unit(self) -> float:
        return self._value

    def observe(self, units: int, seconds: float) -> None:
        """`units` took `seconds`; an empty or instantaneous measurement is ignored."""
        if units <= 0 or not seconds > 0.0:
            return
        measured = seconds / units
        self._value = (1.0 - self._weight) * self._value + self._weight * measured


def chunk_atoms(
    budget_secs: float, secs_per_atom: float, *, min_atoms: int = 1, max_atoms: int = 1024
) -> int:
    """How many atoms fit in `budget_secs` at `secs_per_atom`, within [min_atoms, max_atoms]."""
    if not 1 <= min_atoms <= max_atoms:
        raise ValueError(f"need 1 <= min_atoms <= max_atoms, got {min_atoms}, {max_atoms}")
    if secs_per_atom <= 0.0:
        return max_atoms
    fits = math.floor(budget_secs / secs_per_atom + 1e-9)
    return max(min_atoms, min(max_atoms, fits))


def chunk_prefix(
    sizes: Sequence[int],
    budget_secs: float,
    *,
    secs_per_byte: float,
    secs_per_atom: float = 0.0,
    min_atoms: int = 1,
    max_atoms: int = 1024,
) -> int:
    """How many leading records (of `sizes` bytes each) fit in `budget_secs`.

    A record is estimated at `secs_per_atom + size * secs_per_byte` (text bytes are a better
    proxy for tokens than a count when lengths are heavy-tailed). At least `min_atoms`
    records are taken when there are that many (at least one, so a chunk always makes
    progress; more keeps a slow model's passes big enough to be efficient); at most
    `max_atoms`.
    """
    if not 1 <= min_atoms <= max_atoms:
        raise ValueError(f"need 1 <= min_atoms <= max_atoms, got {min_atoms}, {max_atoms}")
    spent = 0.0
    count = 0
    for size in sizes[:max_atoms]:
        cost = secs_per_atom + size * secs_per_byte
        if count >= min_atoms and spent + cost > budget_secs + 1e-12:
            break
        spent += cost
        count += 1
    return count


def _non_negative(seconds: float) -> float:
    if math.isnan(seconds) or seconds < 0.0:
        raise ValueError(f"model seconds must be non-negative, got {seconds}")
    return seconds
