"""The processor's context: every long-lived piece, built once at start-up.

`open_processor` enters the pieces in start-up order on one `AsyncExitStack` (control log
replayed, model fingerprints checked and recorded, then the models the routing needs, then
the clients of the live path) and closes
them in reverse, each shielded and bounded, so a cancelled run still leaves the group
cleanly. The context fills as start-up proceeds; /metrics and /readyz read it meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from schemas.control import ModelFingerprint
from stream.config import Config
from stream.core.routing import RoutingState
from stream.embed.pool import ModelPool
from stream.errors import BrokerUnavailable, FingerprintMismatch, ModelLoadError
from stream.kafka.consumer import GroupConsumer
from stream.kafka.producer import OutputProducer
from stream.processor.backfill import MigrationWorker
from stream.processor.control import MAX_OUTAGE_BACKOFF_SECS, OUTAGE_BACKOFF_SECS, ControlPlane
from stream.processor.inference import Inference
from stream.processor.live import LiveConsumer
from stream.processor.sensors import ProcessorStats, Sensor, Sensors
from stream.processor.transactions import PartitionTransactions
from stream.processor.window import WindowProcessor

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECS = 30
T = TypeVar("T")


class Health(Sensor):
    """What readiness means: models loaded, control log replayed, partitions assigned, and
    Kafka reachable now."""

    def __init__(self) -> None:
        self.models_loaded = False
        self.control_replayed = False
        self.assigned = False
        self.broker_reachable = True
        self.stopping = False

    @property
    def ready(self) -> bool:
        """Ready to take traffic (and to count in a rollout)."""
        started = self.models_loaded and self.control_replayed and self.assigned
        return started and self.broker_reachable and not self.stopping

    def on_broker(self, reachable: bool) -> None:
        """Kafka unreachable: not ready until it is back (the processor keeps running)."""
        self.broker_reachable = reachable

    def on_assigned(self, partitions: Sequence[int]) -> None:
        """Partitions assigned: the instance takes part in the group."""
        self.assigned = True


@dataclass
class ProcessorContext:
    """One processor's pieces; `control` and `live` exist once start-up got that far.

    `sensors` hear every event (metrics, the bench, tests); `health` always does.
    """

    config: Config
    models: ModelPool
    sensors: list[Sensor] = field(default_factory=list)
    stats: ProcessorStats = field(default_factory=ProcessorStats)
    health: Health = field(default_factory=Health)
    control: ControlPlane | None = None
    live: LiveConsumer | None = None

    def routing(self) -> RoutingState | None:
        """The routing state, once the control log is replayed."""
        if self.control is None or not self.control.replayed.is_set():
            return None
        return self.control.state

    def lag(self) -> dict[tuple[str, int], int]:
        """Atoms not yet processed per owned partition (empty before the live path runs)."""
        return self.live.offsets.lag() if self.live is not None else {}


@asynccontextmanager
async def open_processor(
    context: ProcessorContext, *, role: str
) -> AsyncIterator[tuple[LiveConsumer, ControlPlane]]:
    """Start every piece of `context` in order; yield the live path and the control plane."""
    config = context.config
    sensor = Sensors(context.health, *context.sensors)
    async with AsyncExitStack() as stack:
        control = await _enter(
            stack, lambda: ControlPlane(config, publish_status=True, sensor=sensor)
        )
        context.control = control
        state = await control.replay()
        context.health.control_replayed = True
        log.info(
            "control log replayed to offset %s (%s, %d records folded): %s",
            state.control_offset,
            "no snapshot"
            if control.resumed_from is None
            else f"from the snapshot to offset {control.resumed_from}",
            control.folded_records,
            state.status(),
        )
        state = await record_fingerprints(control, context.models, config)
        writes = state.routing_config().write_models
        for model in _needed_models(state):
            try:
                await context.models.get(model)
            except ModelLoadError as exc:
                if model in writes and not _target_only(state, model):
                    raise
                # A migration target that cannot load fails that migration, not the processor.
                log.error("%s (the live path fails the migration that needs it)", exc)
        context.health.models_loaded = True
        transactions = None
        if config.kafka.exactly_once:
            transactions = await _enter(stack, lambda: PartitionTransactions(config))
        migration = await _enter(
            stack,
            lambda: MigrationWorker(
                config,
                control,
                context.stats,
                backfill=role != "live",
                transactions=transactions,
            ),
        )
        producer = await _enter(stack, lambda: OutputProducer(config.kafka))
        consumer = await _enter(
            stack,
            lambda: GroupConsumer(
                config.kafka, config.topics.atoms, group_id=config.kafka.group_id
            ),
        )
        inference = Inference(
            config.batching,
            context.stats,
            sensor,
            tokenize_beside_model=config.runtime.tokenize_beside_model
            if config.runtime.tokenize_beside_model is not None
            else config.runtime.device != "cpu",
        )
        processor = WindowProcessor(config, context.models, producer, inference, context.stats)
        context.live = LiveConsumer(
            config, consumer, processor, control, migration, sensor, transactions=transactions
        )
        yield context.live, control


async def record_fingerprints(
    control: ControlPlane, models: ModelPool, config: Config
) -> RoutingState:
    """Check the configured models against the control log's fingerprints; record new ones.

    A model the routing writes or migrates to whose fingerprint differs from the log's
    raises `FingerprintMismatch` (the processor does not start). Every configured model
    the log has no fingerprint for yet is recorded now, before the first atom, so the log
    holds the weights a name had when first written. Instances that start together may
    append the same record twice (the first wins), or race with different weights: the
    log is read again after appending, and a loser refuses to start. From here on `models`
    refuses to load a model whose fingerprint differs from the log's (a migration target
    that changed since).
    """
    models.check_against(lambda name: control.state.fingerprints.get(name))
    state = control.state
    needed = _needed_models(state)
    current: dict[str, str] = {}
    for name in config.models:
        try:
            current[name] = await models.fingerprint(name)
        except ModelLoadError as exc:
            if name in needed:
                raise
            log.warning("model %s: not fingerprinted (%s); recorded at a later start", name, exc)
    for name in needed:
        models.check(name, current[name])
    missing = sorted(name for name in current if name not in state.fingerprints)
    for name in missing:
        offset = await control.append(ModelFingerprint(model=name, fingerprint=current[name]))
        log.info(
            "model %s: fingerprint %s recorded at control offset %d", name, current[name], offset
        )
    if missing:
        state = await control.replay()
        for name in needed:
            models.check(name, current[name])
    for name, fingerprint in current.items():
        recorded = state.fingerprints.get(name)
        if name not in needed and recorded not in (None, fingerprint):
            log.warning(
                "%s; the routing does not write it now, and loading it for a migration fails",
                FingerprintMismatch(name, fingerprint, recorded),
            )
    return state


async def _enter(stack: AsyncExitStack, make: Callable[[], AbstractAsyncContextManager[T]]) -> T:
    """Enter a fresh `make()` on `stack`; its exit runs shielded from cancellation, bounded.

    Kafka answered the processor's first contact (`prepare_topics`), so a client that cannot
    reach it now meets an outage, which start-up rides out like a running processor: the
    half-started client is closed and a new one tried, with backoff, until Kafka is back.
    """
    backoff = OUTAGE_BACKOFF_SECS
    while True:
        resource = make()
        try:
            entered = await resource.__aenter__()
            break
        except BrokerUnavailable as exc:
            await _close(resource, exc)
            log.warning("start-up: %s; trying again in %.1fs", exc, backoff)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, MAX_OUTAGE_BACKOFF_SECS)

    async def close(*exc_info: object) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE_SECS):
            await resource.__aexit__(*exc_info)  # type: ignore[arg-type]

    stack.push_async_exit(close)
    return entered


async def _close(resource: AbstractAsyncContextManager[object], exc: BaseException) -> None:
    """Close what a failed `__aenter__` may have started (its clients' tasks and sockets)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE_SECS):
        try:
            await resource.__aexit__(type(exc), exc, exc.__traceback__)
        except Exception as closing:  # a client that never started may not close cleanly
            log.debug("start-up: closing a client that failed to start: %r", closing)


def _target_only(state: RoutingState, model: str) -> bool:
    """`model` is an active migration's target, written beside a source that still works."""
    migration = state.active
    return migration is not None and migration.target == model and migration.source != model


def _needed_models(state: RoutingState) -> list[str]:
    models = list(state.routing_config().write_models)
    if state.active is not None and state.active.target not in models:
        models.append(state.active.target)
    return models
