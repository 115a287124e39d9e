"""Model fingerprints: one hash of everything that determines a model's vectors.

`sha256:<hex>` over the model directory's weights, architecture and tokenizer files (their
names and bytes, streamed in chunks) and the settings applied around the model: pooling,
normalization, prefixes and `max_tokens`. Two configurations with the same fingerprint give
the same vector for the same text; new weights under an old model name change it.

Hashing reads every weight byte (about 0.2 s per 100 MB), so results are cached per process,
keyed by the files' sizes and modification times: a file changed in place is hashed again.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import msgspec

from stream.config import ModelConfig
from stream.errors import ModelLoadError

# Files that decide what the encoder computes. Anything else in a model directory (README,
# sentence-transformers module configs, training metadata) does not reach this project's
# forward pass, so it does not count.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_MODEL_FILES = frozenset(
    {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "tokenizer.model",
    }
)
_CHUNK_BYTES = 1024 * 1024
_FORMAT = b"lattice-model-fingerprint/1\n"

_cache: dict[tuple[object, ...], str] = {}
_cache_lock = threading.Lock()


class _Settings(msgspec.Struct, frozen=True, kw_only=True):
    """The configured settings that change vectors, in a canonical order."""

    pooling: str
    normalize: bool
    max_tokens: int
    query_prefix: str
    document_prefix: str


def model_fingerprint(model_dir: str | Path, model_config: ModelConfig) -> str:
    """`sha256:<hex>` of the model files in `model_dir` and the vector-shaping settings.

    Blocking (reads the weights); call it from a worker thread on the event loop.
    Raises `ModelLoadError` when the directory holds no weights file.
    """
    directory = Path(model_dir)
    files = _model_files(directory)
    if not any(path.name.endswith(_WEIGHT_SUFFIXES) for path in files):
        raise ModelLoadError(f"model fingerprint: no weights file in {directory}")
    stats = tuple((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files)
    key = (str(directory.resolve()), stats, model_config)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256(_FORMAT)
    for path in files:
        name = path.name.encode()
        digest.update(b"file %d %s %d\n" % (len(name), name, path.stat().st_size))
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK_BYTES):
                digest.update(chunk)
    settings = _Settings(
        pooling=model_config.pooling,
        normalize=model_config.normalize,
        max_tokens=model_config.max_tokens,
        query_prefix=model_config.query_prefix,
        document_prefix=model_config.document_prefix,
    )
    digest.update(b"settings " + msgspec.json.encode(settings))
    fingerprint = f"sha256:{digest.hexdigest()}"
    with _cache_lock:
        _cache[key] = fingerprint
    return fingerprint


def model_directory(name: str, model_config: ModelConfig) -> Path:
    """The local directory a model loads from: its `path`, or the cached `hf_id` snapshot."""
    if model_config.path is not None:
        return Path(model_config.path)
    if model_config.hf_id is None:
        raise ModelLoadError(f"model {name}: no path or hf_id configured")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_config.hf_id, local_files_only=True))
    except Exception as exc:  # the hub raises several unrelated classes for "not cached"
        raise ModelLoadError(
            f"model {name}: {model_config.hf_id} is not in the local Hugging Face cache"
        ) from exc


def _model_files(directory: Path) -> list[Path]:
    """The fingerprinted files, sorted by name (top level only: where transformers looks)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise ModelLoadError(f"model fingerprint: cannot read {directory}: {exc}") from exc
    return [
        path
        for path in entries
        if path.is_file() and (path.name in _MODEL_FILES or path.name.endswith(_WEIGHT_SUFFIXES))
    ]
