"""`lattice-embed serve` on a real broker: it follows the migration, matches the processor's
vectors, batches concurrent requests, and answers every error in the OpenAI shape."""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import msgspec
import numpy as np
import pytest

from schemas.control import BackfillConfig, ControlEvent, Rollback, StartMigration
from schemas.embeddings import decode_embedding
from schemas.routing import RoutingPhase
from stream.config import Config
from stream.core.routing import apply, initial_state, reject_malformed
from stream.embed.fingerprint import model_fingerprint
from stream.ops.operator import send_command
from stream.processor.control import record_time
from stream.serve.api import build_app
from stream.serve.asgi import serve_asgi
from stream.serve.service import EmbeddingService
from tests.support.kafka import atom_value, create_topic, end_offsets, produce, read_all, unique
from tests.support.processor import processor, wait_for_routing

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]

PARTITIONS = 2
SWITCH_SECS = 1.0  # CONTRACT section 10: answers follow the query model within 1 s


def with_prefixes(config: Config) -> Config:
    """The config with asymmetric prefixes on `tiny`, so input_type visibly matters."""
    models = dict(config.models)
    models["tiny"] = msgspec.structs.replace(
        models["tiny"], query_prefix="query: ", document_prefix="passage: "
    )
    return msgspec.structs.replace(config, models=models)


def with_serve(config: Config, **serve: Any) -> Config:
    return msgspec.structs.replace(config, serve=msgspec.structs.replace(config.serve, **serve))


@asynccontextmanager
async def serving(config: Config, *, ready: bool = True) -> AsyncIterator[Serving]:
    """The API on a free loopback port; `ready` waits until the service is ready."""
    service = EmbeddingService(config)
    async with anyio.create_task_group() as tasks:
        port = await tasks.start(
            functools.partial(serve_asgi, build_app(service), "127.0.0.1", 0, name="test API")
        )
        running = Serving(service=service, tasks=tasks, base_url=f"http://127.0.0.1:{port}")
        if ready:
            await running.start()
        async with httpx.AsyncClient(
            base_url=running.base_url, timeout=30, trust_env=False
        ) as client:
            running.client = client
            yield running
        tasks.cancel_scope.cancel()


@dataclass
class Serving:
    service: EmbeddingService
    tasks: Any
    base_url: str
    client: httpx.AsyncClient = field(init=False)

    async def start(self) -> None:
        with anyio.fail_after(60):
            await self.tasks.start(self.service.run)

    async def embed(self, **body: Any) -> dict[str, Any]:
        response = await self.client.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer


def vectors(answer: dict[str, Any]) -> np.ndarray[Any, Any]:
    return np.array([item["embedding"] for item in answer["data"]], dtype=np.float32)


def start(migration_id: str, **backfill: Any) -> StartMigration:
    return StartMigration(
        migration_id=migration_id,
        source_model="tiny",
        target_model="tinyb",
        backfill=msgspec.convert({"batch_size": 20, **backfill}, type=BackfillConfig),
    )


@dataclass
class Poller:
    """Asks the API for the query model back to back, and remembers who answered when."""

    serving: Serving
    answers: list[tuple[float, str]] = field(default_factory=list)
    answered: anyio.Event = field(default_factory=anyio.Event)

    async def run(self) -> None:
        while True:
            sent = time.time()
            answer = await self.serving.embed(input="which model answers?")
            self.answers.append((sent, answer["model"]))
            answered, self.answered = self.answered, anyio.Event()
            answered.set()
            await anyio.sleep(0.01)  # pacing: about 100 queries/s leaves the CPUs to the test

    async def until(self, model: str, *, within: float) -> None:
        """Wait for the first answer from `model`."""
        with anyio.fail_after(within):
            while not self.answers or self.answers[-1][1] != model:
                await self.answered.wait()

    def switch_lag(self, at: float, model: str) -> float:
        """How long after `at` answers still came from another model than `model`: the send
        time of the last answer not from `model`, minus `at` (<= 0: switched at once)."""
        stale = [sent for sent, answered in self.answers if sent >= at and answered != model]
        assert any(sent >= at and answered == model for sent, answered in self.answers)
        return (max(stale) - at) if stale else 0.0


async def query_model_changes(config: Config) -> list[tuple[int, float, str]]:
    """Replay the control log: (offset, broker time, new query model) at every change."""
    decoder = msgspec.json.Decoder(ControlEvent)
    state = initial_state(config.routing.stable_model, set(config.models))
    changes: list[tuple[int, float, str]] = []
    for record in await read_all(config.kafka.bootstrap_servers, config.topics.control):
        at = record_time(record.timestamp)
        before = state.route_query()
        try:
            state = apply(state, decoder.decode(record.value), record.offset, at)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            state = reject_malformed(state, record.offset, at, str(exc))
        if state.route_query() != before:
            changes.append((record.offset, record.timestamp / 1000, state.route_query()))
    return changes


async def processor_vectors(config: Config, model: str) -> dict[str, np.ndarray[Any, Any]]:
    """The last vector per atom on a model's topic."""
    latest: dict[str, np.ndarray[Any, Any]] = {}
    for record in await read_all(config.kafka.bootstrap_servers, config.topics.embeddings(model)):
        if record.value is not None:
            encoding = dict(record.headers).get("lattice.encoding")
            decoded = decode_embedding(record.value, encoding.decode() if encoding else None)
            latest[decoded.atom_id] = np.array(decoded.vector, dtype=np.float32)
    return latest


@pytest.mark.timeout(240)
async def test_serve_follows_the_migration_and_matches_the_processor(
    bootstrap: str, migration_config: Any
) -> None:
    atoms = unique("atoms")
    await create_topic(bootstrap, atoms, partitions=PARTITIONS)
    config, _ = migration_config(atoms)
    config = with_prefixes(config)
    texts = {f"a-{i}": f"atom {i} is about topic {i % 7} and more" for i in range(120)}
    await produce(bootstrap, atoms, [(k.encode(), atom_value(k, t)) for k, t in texts.items()])
    async with processor(config) as running, serving(config) as api:
        await running.drained(await end_offsets(bootstrap, atoms, PARTITIONS))
        answer = await api.embed(input="a question")
        assert answer["model"] == "tiny" and answer["lattice"]["phase"] == "stable"
        tiny = config.models["tiny"]
        assert tiny.path is not None
        assert answer["lattice"]["fingerprint"] == await anyio.to_thread.run_sync(
            model_fingerprint, tiny.path, tiny
        )

        poller = Poller(api)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(poller.run)
            accepted, _ = await send_command(config, start("m1", rollback_window_secs=3600))
            assert accepted
            await wait_for_routing(
                config,
                lambda s: s.routing_config().phase is RoutingPhase.ROLLBACK_WINDOW,
                within=120,
            )
            await poller.until("tinyb", within=10)
            accepted, status = await send_command(config, Rollback(migration_id="m1"))
            assert accepted and status.query_model == "tiny"
            await poller.until("tiny", within=10)
            tasks.cancel_scope.cancel()
        changes = await query_model_changes(config)
        assert [model for _, _, model in changes] == ["tinyb", "tiny"], changes
        (_, cutover_at, _), (_, rollback_at, _) = changes
        assert poller.switch_lag(cutover_at, "tinyb") < SWITCH_SECS
        assert poller.switch_lag(rollback_at, "tiny") < SWITCH_SECS
        answer = await api.embed(input="a question")
        assert answer["model"] == "tiny"
        assert answer["lattice"]["control_offset"] == status.control_offset

        # Parity: a document vector is the processor's vector for the same text, per model.
        ids = sorted(texts)[:40]
        for model in ("tiny", "tinyb"):
            produced = await processor_vectors(config, model)
            answer = await api.embed(
                input=[texts[i] for i in ids], model=model, input_type="document"
            )
            assert answer["model"] == model
            served = vectors(answer)
            assert served.shape[1] == produced[ids[0]].shape[0]
            worst = max(float(np.abs(served[n] - produced[i]).max()) for n, i in enumerate(ids))
            assert worst <= 1e-5, f"{model}: max difference {worst}"
        query = vectors(await api.embed(input=texts[ids[0]], model="tiny"))[0]
        document = (await processor_vectors(config, "tiny"))[ids[0]]
        assert np.abs(query - document).max() > 1e-3, "input_type query applies query_prefix"


@pytest.mark.timeout(120)
async def test_every_error_has_its_status_and_the_openai_shape(
    bootstrap: str, make_config: Any
) -> None:
    config, _ = make_config(unique("atoms"), extra="[limits]\nmax_event_bytes = 1000\n")
    config = with_serve(config, api_keys=["key-one", "key-two"], max_inputs=8, max_queued_inputs=6)
    good = {"Authorization": "Bearer key-two"}
    async with serving(config, ready=False) as api:
        client = api.client
        early = await client.post("/v1/embeddings", json={"input": "x"}, headers=good)
        assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/healthz")).status_code == 200
        await api.start()
        assert (await client.get("/readyz")).status_code == 200

        async def post(body: Any, headers: dict[str, str] | None = None, **kw: Any) -> Any:
            return await client.post(
                "/v1/embeddings",
                headers=good if headers is None else headers,
                **kw,
                **({} if "content" in kw else {"json": body}),
            )

        cases: list[tuple[int, str, httpx.Response]] = [
            (401, "invalid_api_key", await post({"input": "x"}, headers={})),
            (401, "invalid_api_key", await post({"input": "x"}, {"Authorization": "Bearer nope"})),
            (401, "invalid_api_key", await post({"input": "x"}, {"Authorization": "key-two"})),
            (400, "empty_input", await post({"input": ""})),
            (400, "empty_input", await post({"input": []})),
            (400, "empty_input", await post({"input": ["fine", "   "]})),
            (400, "invalid_input", await post({"input": ["fine", 3]})),
            (400, "invalid_input", await post({"input": [[101, 102]]})),
            (400, "too_many_inputs", await post({"input": ["t"] * 9})),
            (400, "input_too_large", await post({"input": "é" * 501})),
            (400, "model_not_found", await post({"input": "x", "model": "nope"})),
            (400, "invalid_json", await post(None, content=b"{not json")),
            (400, "invalid_value", await post({"text": "no input field"})),
            (400, "invalid_value", await post({"input": "x", "input_type": "passage"})),
            (400, "invalid_value", await post({"input": "x", "encoding_format": "int8"})),
            (400, "invalid_dimensions", await post({"input": "x", "dimensions": 7})),
            (429, "queue_full", await post({"input": ["t"] * 7})),
            (404, "not_found", await client.get("/v1/nothing-here", headers=good)),
        ]
        for status, code, response in cases:
            assert response.status_code == status, (status, code, response.text)
            error = response.json()["error"]
            assert error["code"] == code and error["type"] and error["message"], error
        assert (await client.get("/v1/models")).status_code == 401

        ok = await post({"input": ["é" * 500, "short"], "encoding_format": "float"})
        assert ok.status_code == 200, ok.text
        packed = await post({"input": ["é" * 500, "short"], "encoding_format": "base64"})
        floats = vectors(ok.json())
        unpacked = np.stack(
            [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in packed.json()["data"]]
        )
        assert np.array_equal(floats, unpacked)
        usage = ok.json()["usage"]
        assert usage["prompt_tokens"] == usage["total_tokens"] > 2

        models = (await client.get("/v1/models", headers=good)).json()["data"]
        assert [(m["id"], m["dim"], m["query_model"], m["write_model"]) for m in models] == [
            ("minilm", 384, False, False),  # the bundled model is always configured
            ("tiny", 32, True, True),
        ]
        assert all(m["fingerprint"].startswith("sha256:") for m in models)
        assert [m["loaded"] for m in models] == [False, True], "models load lazily"
        routing = (await client.get("/v1/routing", headers=good)).json()
        assert routing["query_model"] == "tiny" and routing["phase"] == "stable"
        metrics = (await client.get("/metrics")).text
        assert 'lattice_serve_requests_total{endpoint="embeddings",status="401"} 3.0' in metrics
        assert 'lattice_serve_requests_total{endpoint="embeddings",status="429"} 1.0' in metrics
        assert "lattice_serve_ready 1.0" in metrics


@pytest.mark.timeout(120)
async def test_concurrent_requests_share_model_calls(bootstrap: str, make_config: Any) -> None:
    config, _ = make_config(unique("atoms"))
    async with serving(config) as api:
        requests = 48
        answers: list[dict[str, Any]] = []

        async def one(i: int) -> None:
            answer = await api.embed(input=f"request {i} " * (1 + i % 5))
            answers.append({**answer, "index_text": i})

        async with anyio.create_task_group() as tasks:
            for i in range(requests):
                tasks.start_soon(one, i)
        assert len(answers) == requests
        metrics = (await api.client.get("/metrics")).text
        calls = sample(metrics, 'lattice_serve_batch_requests_count{model="tiny"}')
        batched = sample(metrics, 'lattice_serve_batch_requests_sum{model="tiny"}')
        assert batched == requests
        assert calls < requests, "concurrent requests were batched into fewer model calls"
        # Batched with others, a text gets the vector it gets alone.
        for i in (0, 7, 31):
            alone = vectors(await api.embed(input=f"request {i} " * (1 + i % 5)))
            together = next(a for a in answers if a["index_text"] == i)
            assert np.allclose(alone, vectors(together), atol=1e-5)


def sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


@pytest.mark.timeout(120)
async def test_the_openai_client_calls_the_api(bootstrap: str, make_config: Any) -> None:
    openai = pytest.importorskip("openai")
    config, _ = make_config(unique("atoms"))
    config = with_serve(config, api_keys=["secret"])
    async with serving(config) as api:
        reference = vectors(await _plain(api, "secret"))
        async with httpx.AsyncClient(trust_env=False) as http:
            client = openai.AsyncOpenAI(
                base_url=f"{api.base_url}/v1", api_key="secret", http_client=http, max_retries=0
            )
            result = await client.embeddings.create(
                model="tiny",
                input=["hello world", "bonjour"],
                extra_body={"input_type": "document"},
            )
            assert result.model == "tiny" and len(result.data) == 2
            got = np.array([d.embedding for d in result.data], dtype=np.float32)
            assert np.allclose(got, reference, atol=1e-6)
            floats = await client.embeddings.create(
                model="tiny",
                input="hello world",
                encoding_format="float",
                extra_body={"input_type": "document"},
            )
            assert np.allclose(floats.data[0].embedding, reference[0], atol=1e-6)
            listed = await client.models.list()
            assert [m.id for m in listed.data] == ["minilm", "tiny"]
            wrong = openai.AsyncOpenAI(
                base_url=f"{api.base_url}/v1", api_key="wrong", http_client=http, max_retries=0
            )
            with pytest.raises(openai.AuthenticationError):
                await wrong.embeddings.create(model="tiny", input="x")


async def _plain(api: Serving, key: str) -> dict[str, Any]:
    response = await api.client.post(
        "/v1/embeddings",
        json={"input": ["hello world", "bonjour"], "input_type": "document"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer
