"""Runs the processor: topics, then the context (control log, models, clients), then the
live path, the control log's tail and the metrics endpoint side by side until stopped."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from schemas.routing import RoutingStatus
from stream.config import Config
from stream.embed.embedder import check_model_source
from stream.embed.pool import ModelPool
from stream.errors import BrokerUnavailable
from stream.processor.context import Health, ProcessorContext, open_processor
from stream.processor.control import ControlPlane
from stream.processor.metrics import Metrics
from stream.processor.sensors import ProcessorStats, Sensor
from stream.processor.stages import StageClock
from stream.processor.topics import prepare_topics
from stream.processor.topicwatch import watch_topics

log = logging.getLogger(__name__)

START_BACKOFF_SECS = 1.0  # first wait before starting again after an outage at start-up
MAX_START_BACKOFF_SECS = 10.0


async def run_processor(
    config: Config,
    *,
    role: str = "all",
    stop: anyio.Event | None = None,
    sensor: Sensor | None = None,
    models: ModelPool | None = None,
    stages: StageClock | None = None,
) -> ProcessorStats:
    """Run the processor until `stop` is set (or SIGTERM/SIGINT), then drain and return.

    Start-up order matters: topics, then the whole control log replayed, then the models
    the routing needs, and only then the first atom. `sensor` hears every event, including
    the metrics endpoint's bound port (`on_listening`). `stages` (the bench) times each
    stage of the pipeline.
    """
    stop = stop or anyio.Event()
    running = anyio.Event()  # set once the live path runs: from then on a stop drains
    context = ProcessorContext(config, models or ModelPool(config))
    context.stats.stages = stages
    stable = config.routing.stable_model
    try:
        async with anyio.create_task_group() as outer:
            # Signals are heard from the first moment: a SIGTERM while the models load or
            # the control log replays ends the start cleanly instead of killing the process.
            outer.start_soon(_stop_on_signals, stop)
            with anyio.CancelScope() as run:
                outer.start_soon(_abandon_start_on_stop, stop, running, run)
                await anyio.to_thread.run_sync(check_model_source, stable, config.models[stable])
                metrics = Metrics(context) if config.metrics.enabled else None
                context.sensors.extend(s for s in (metrics, sensor) if s is not None)
                await _start_through_outages(config, context, role, metrics, sensor, stop, running)
            outer.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _sole_error(group) from None
    if not running.is_set():
        log.info("stopped during start-up, before the first atom")
    stats = context.stats
    log.info(
        "stopped: atoms in %s, outputs %s, dead letters %s",
        dict(stats.atoms_in),
        {f"{model}/{path}": n for (model, path), n in stats.outputs.items()},
        dict(stats.dead_letters),
    )
    return stats


async def _start_through_outages(
    config: Config,
    context: ProcessorContext,
    role: str,
    metrics: Metrics | None,
    sensor: Sensor | None,
    stop: anyio.Event,
    running: anyio.Event,
) -> None:
    """Run the processor; Kafka unreachable before the live path runs (a broker restarting
    while this pod starts) starts it again with backoff, for `[kafka] start_timeout_secs`.
    Past that, or for any other error, the error ends the start (exit 1)."""
    deadline = time.monotonic() + config.kafka.start_timeout_secs
    backoff = START_BACKOFF_SECS
    while True:
        context.health = Health()  # what an earlier attempt got to is not ready any more
        try:
            await _run(config, context, role, metrics, sensor, stop, running)
            return
        except (BrokerUnavailable, BaseExceptionGroup) as raised:
            error = _sole_error(raised) if isinstance(raised, BaseExceptionGroup) else raised
            left = deadline - time.monotonic()
            if running.is_set() or not isinstance(error, BrokerUnavailable) or left < backoff:
                raise
            log.warning(
                "Kafka unreachable during the start (%s); starting again in %.0f s (for %.0f s "
                "more, [kafka] start_timeout_secs)",
                error,
                backoff,
                left,
            )
        await anyio.sleep(backoff)
        backoff = min(2 * backoff, MAX_START_BACKOFF_SECS)


async def _run(
    config: Config,
    context: ProcessorContext,
    role: str,
    metrics: Metrics | None,
    sensor: Sensor | None,
    stop: anyio.Event,
    running: anyio.Event,
) -> None:
    # First contact with Kafka before anything else starts: a bad broker address or bad
    # credentials end the start with one line.
    if await prepare_topics(config) is None:
        log.warning("input topic %s does not exist yet; waiting for it", config.topics.atoms)
    async with anyio.create_task_group() as server:
        if metrics is not None:
            port = await server.start(_serve_metrics, metrics, config)
            if sensor is not None:
                sensor.on_listening(port)
        try:
            async with (
                open_processor(context, role=role) as (live, control),
                anyio.create_task_group() as tasks,
            ):
                running.set()
                tasks.start_soon(control.tail)
                tasks.start_soon(watch_topics, config, lambda: _write_models(control))
                await live.run(stop)
                tasks.cancel_scope.cancel()
        finally:
            context.health.stopping = True
            server.cancel_scope.cancel()


async def _abandon_start_on_stop(
    stop: anyio.Event, running: anyio.Event, run: anyio.CancelScope
) -> None:
    """A stop before the live path runs cancels the start; after it, the live path drains."""
    await stop.wait()
    if not running.is_set():
        run.cancel()


def _write_models(control: ControlPlane) -> list[str]:
    return list(control.state.routing_config().write_models)


async def _serve_metrics(
    metrics: Metrics, config: Config, *, task_status: TaskStatus[int | None] = TASK_STATUS_IGNORED
) -> None:
    """The metrics endpoint; a port that cannot be bound is logged, not fatal."""
    try:
        await metrics.serve(config.metrics.host, config.metrics.port, task_status=task_status)
    except OSError as exc:
        log.error(
            "metrics: cannot listen on %s:%d: %s", config.metrics.host, config.metrics.port, exc
        )
        task_status.started(None)


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """A task group's one real failure, so callers see `BrokerUnavailable`, not a group."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        error = pending.pop()
        if isinstance(error, BaseExceptionGroup):
            pending.extend(error.exceptions)
        else:
            leaves.append(error)
    real = [e for e in leaves if not isinstance(e, anyio.get_cancelled_exc_class())]
    return real[0] if len(real) == 1 else group


async def _stop_on_signals(stop: anyio.Event) -> None:
    """SIGTERM/SIGINT drain and stop; SIGUSR1 logs every task's stack (a stuck process)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                _log_task_stacks()
                continue
            log.info("received %s: draining the window in flight", signal.Signals(signum).name)
            stop.set()


def _log_task_stacks() -> None:
    """One log record with the await stack of every task on the loop."""
    lines = []
    for task in asyncio.all_tasks():
        lines.append(f"task {task.get_name()}:")
        awaiting: Any = task.get_coro()
        while awaiting is not None:  # the chain of awaits (a suspended task's stack)
            frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "gi_frame", None)
            if frame is not None:
                code = frame.f_code
                lines.append(f"  {code.co_filename}:{frame.f_lineno} {code.co_name}")
            awaiting = getattr(awaiting, "cr_await", None) or getattr(
                awaiting, "gi_yieldfrom", None
            )
    log.warning("SIGUSR1: %d tasks\n%s", len(asyncio.all_tasks()), "\n".join(lines))


async def read_status(config: Config) -> RoutingStatus:
    """The routing rebuilt from the whole control log (what every instance computes)."""
    await prepare_topics(config)
    async with ControlPlane(config) as control:
        return (await control.replay()).status()
