"""The embeddings service behind the API: routing from the control log, models, batchers.

It follows the control log as a processor does (replay, then tail) but never appends to it.
Models load lazily through the `ModelPool`; the current query model is loaded before the
service reports ready, and every model the routing writes or migrates to is loaded in the
background as soon as the routing names it, so a cutover does not wait on a model load.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskGroup, TaskStatus

from schemas.routing import RoutingPhase
from stream.config import Config
from stream.core.routing import RoutingState, initial_state
from stream.embed.pool import ModelPool
from stream.errors import LatticeError
from stream.processor.control import ControlPlane
from stream.processor.topics import prepare_topics
from stream.serve.batcher import Batcher, Embedded
from stream.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


class UnknownModel(LatticeError):
    """The request names a model that is not configured."""


class NotReady(LatticeError):
    """The control log is not replayed yet, or the query model is not loaded yet."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's vectors and what produced them."""

    model: str
    embedded: Embedded
    fingerprint: str
    control_offset: int | None
    phase: RoutingPhase


class EmbeddingService:
    """Embeds API requests with the model the routing names now."""

    def __init__(self, config: Config, *, pool: ModelPool | None = None) -> None:
        self.config = config
        self.pool = pool or ModelPool(config)
        self.metrics = ServeMetrics(self)
        self._control: ControlPlane | None = None
        self._batchers: dict[str, Batcher] = {}
        self._fingerprints: dict[str, str] = {}
        self._loading = anyio.Lock()
        # One model call at a time on this device, whichever model: they share its cores.
        self._limiter = anyio.CapacityLimiter(1)
        self._tasks: TaskGroup | None = None
        self._ready = anyio.Event()

    @property
    def ready(self) -> bool:
        """Control log replayed and the query model loaded."""
        return self._ready.is_set()

    @property
    def state(self) -> RoutingState:
        """The routing as last applied from the control log."""
        if self._control is None:
            return initial_state(self.config.routing.stable_model, set(self.config.models))
        return self._control.state

    @property
    def batchers(self) -> Mapping[str, Batcher]:
        """The batchers of the models loaded so far."""
        return self._batchers

    async def wait_ready(self) -> None:
        """Return once the service is ready (`run` replayed the log, the query model loaded)."""
        await self._ready.wait()

    async def wait_applied(self, offset: int) -> RoutingState:
        """The routing once the control record at `offset` is applied (after ready)."""
        await self._ready.wait()
        assert self._control is not None
        return await self._control.wait_applied(offset)

    def readiness(self) -> tuple[bool, str]:
        """Whether ready, and the detail /readyz shows."""
        replayed = self._control is not None and self._control.replayed.is_set()
        loaded = ",".join(sorted(self._batchers)) or "none"
        # An outage leaves the API ready: it answers with the routing it last saw, and says so.
        reachable = self._control is None or self._control.broker_reachable
        detail = f"control_replayed={replayed} models_loaded={loaded} broker_reachable={reachable}"
        return self.ready, detail

    async def run(self, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED) -> None:
        """Replay the control log, load the query model, report ready, then follow the log."""
        await prepare_topics(self.config)
        following = ControlPlane(self.config, ride_outages=True)
        async with following as control, anyio.create_task_group() as tasks:
            self._control = control
            self._tasks = tasks
            await control.replay()
            tasks.start_soon(functools.partial(control.tail, close_windows=False))
            query_model = control.state.route_query()
            await self.batcher(query_model)
            self._ready.set()
            status = control.state.status()
            log.info(
                "serve: ready; query model %s, phase %s, control offset %s",
                status.query_model,
                status.phase,
                status.control_offset,
            )
            task_status.started()
            await self._preload_as_routing_changes(control)

    async def embed(self, texts: Sequence[str], *, model: str | None, query: bool) -> Answer:
        """Embed with `model`, or with the routing's query model at the time of the call."""
        if not self.ready:
            raise NotReady("the embeddings service is starting (control log, query model)")
        state = self.state
        name = model or state.route_query()
        if name not in self.config.models:
            configured = ", ".join(sorted(self.config.models))
            raise UnknownModel(f"model {name!r} is not configured (configured: {configured})")
        batcher = await self.batcher(name)
        embedded = await batcher.embed(texts, query=query)
        return Answer(
            model=name,
            embedded=embedded,
            fingerprint=self._fingerprints[name],
            control_offset=state.control_offset,
            phase=state.routing_config().phase,
        )

    async def batcher(self, name: str) -> Batcher:
        """The batcher of a model, loading the model (and its fingerprint) the first time."""
        if name in self._batchers:
            return self._batchers[name]
        async with self._loading:
            if name not in self._batchers:
                embedder = await self.pool.get(name)
                self._fingerprints[name] = await self.fingerprint(name)
                serve = self.config.serve
                batcher = Batcher(
                    embedder,
                    limiter=self._limiter,
                    max_batch_atoms=serve.max_batch_atoms,
                    max_queued_inputs=serve.max_queued_inputs,
                    on_batch=self.metrics.observe_batch,
                )
                assert self._tasks is not None, "batcher() before run()"
                self._tasks.start_soon(batcher.run)
                self._batchers[name] = batcher
        return self._batchers[name]

    async def fingerprint(self, name: str) -> str:
        """The model's fingerprint (hashed once per process, in a worker thread)."""
        if name not in self._fingerprints:
            self._fingerprints[name] = await self.pool.fingerprint(name)
        return self._fingerprints[name]

    async def _preload_as_routing_changes(self, control: ControlPlane) -> None:
        """Load every model the routing writes or migrates to, as soon as it names one."""
        next_offset = 0
        while True:
            state = control.state
            needed = [state.route_query(), *state.routing_config().write_models]
            if state.active is not None:
                needed.append(state.active.target)
            for name in dict.fromkeys(needed):
                if name not in self._batchers:
                    await self._preload(name)
            if state.control_offset is not None:
                next_offset = max(next_offset, state.control_offset + 1)
            await control.wait_applied(next_offset)
            next_offset += 1  # applied, or skipped (a gap in the log): wait for the next one

    async def _preload(self, name: str) -> None:
        try:
            await self.batcher(name)
        except LatticeError as exc:  # a request for it will try again, and say why
            log.warning("serve: cannot load model %s: %s", name, exc)
