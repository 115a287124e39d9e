"""Embedding models (torch + transformers) behind one small, thread-safe interface.

Every method here is blocking and CPU- or GPU-bound: callers on the event loop run them
in worker threads (`anyio.to_thread.run_sync`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stream.config import ModelConfig
from stream.core.batching import overhead_tokens, plan_by_cost, plan_micro_batches
from stream.errors import ModelLoadError

log = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]

# transformers builds models under process-wide patches of torch (meta-device init), so two
# loads at once in one process corrupt each other ("Cannot copy out of meta tensor"): one
# process may hold several pools (a processor and `serve` side by side, as in tests and the
# demo), so loads are serialized here.
_LOAD_LOCK = threading.Lock()

# The two batches `calibrate` times (rows, tokens): a few short texts, and a full batch of
# medium texts, the range in which the planner chooses between one pass and two.
CALIBRATION_SMALL = (8, 32)
CALIBRATION_LARGE = (32, 64)
CALIBRATION_REPEATS = 3
# Passes of each shape before timing: the first passes after a load run slow. (Timed at
# load, the 4-layer test model still reads 270-570 padded tokens where the same calibration
# reads 800-1,000 a few seconds later and its passes over real windows fit 850-980: pin
# `[batching] batch_overhead_tokens` where that matters.)
CALIBRATION_WARMUP = 2


@dataclass(frozen=True, slots=True)
class Tokenized:
    """Token ids of a list of texts, already cut to the model's window."""

    input_ids: list[list[int]]
    overlong: list[bool]

    @property
    def lengths(self) -> list[int]:
        """Token count of every text, special tokens included."""
        return [len(ids) for ids in self.input_ids]


@dataclass(frozen=True, slots=True)
class EmbedStats:
    """What one `embed_tokens` call did, for metrics and benchmarks."""

    atoms: int
    tokens: int
    padded_tokens: int
    batches: int
    seconds: float


class Embedder:
    """One Hugging Face encoder: tokenizer, model, pooling and normalization.

    Thread-safe: a per-model lock serializes tokenizer and model use (fast tokenizers
    must not be shared between threads).
    """

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        compile: bool = False,
        micro_batch_atoms: int = 64,
        max_batch_tokens: int = 16_384,
    ) -> None:
        self.name = name
        self.config = config
        self.device = device
        self.micro_batch_atoms = micro_batch_atoms
        self.max_batch_tokens = max_batch_tokens
        self.fingerprint: str | None = None  # set by the ModelPool that loads it
        # A forward pass's fixed cost in padded tokens (`calibrate`); None: length buckets.
        self.batch_overhead_tokens: float | None = None
        self._lock = threading.Lock()  # the model: one forward pass at a time
        # The tokenizer apart from the model: the next window tokenizes while this one's
        # forward passes run (the live path's lookahead).
        self._tokenize_lock = threading.Lock()
        with _LOAD_LOCK:
            self._tokenizer, self._model = _load(name, config, device, dtype, compile)
        # Tokenization goes straight to the Rust tokenizer (`tokenizers`), skipping the
        # per-text conversions of transformers' wrapper: two copies of it, truncating at
        # `max_tokens + 1` (to tell overlong texts) and at `max_tokens` (to cut them), the
        # settings transformers would apply for `max_length` with `truncation=True`.
        self._probe = _backend(self._tokenizer, config.max_tokens + 1)
        self._cut = _backend(self._tokenizer, config.max_tokens)
        # Equal for two models whose `tokenize` gives the same ids for every text (the same
        # tokenizer, window and document prefix): a dual-write window tokenizes once for both.
        # The probe's serialized form holds its truncation at `max_tokens + 1`, so the window
        # is in it; `_cut` is the same tokenizer one token shorter.
        self.tokenization_key = hashlib.sha256(
            self._probe.to_str().encode() + b"\0" + config.document_prefix.encode()
        ).hexdigest()
        self._uses_token_types = "token_type_ids" in self._tokenizer.model_input_names
        self.dim = int(self._model.config.hidden_size)
        self.pad_id = int(self._tokenizer.pad_token_id or 0)

    def tokenize(self, texts: Sequence[str], *, query: bool = False) -> Tokenized:
        """Tokenize with the document (or query) prefix, cut to `max_tokens`.

        A text is overlong when it needs more than `max_tokens` tokens, special tokens
        and prefix included (Hugging Face's `max_length`).
        """
        if not texts:  # a window of deletes only; tokenizers reject an empty batch
            return Tokenized(input_ids=[], overlong=[])
        prefix = self.config.query_prefix if query else self.config.document_prefix
        limit = self.config.max_tokens
        prefixed = [prefix + text for text in texts] if prefix else list(texts)
        with self._tokenize_lock:
            probe = _ids(self._probe, prefixed)
            overlong = [len(ids) > limit for ids in probe]
            long_texts = [text for text, long in zip(prefixed, overlong, strict=True) if long]
            if long_texts:
                cut = iter(_ids(self._cut, long_texts))
                probe = [
                    next(cut) if long else ids for ids, long in zip(probe, overlong, strict=True)
                ]
        return Tokenized(input_ids=probe, overlong=overlong)

    def embed_batch(self, input_ids: Sequence[Sequence[int]]) -> Vectors:
        """One forward pass over one micro-batch (padded to its longest row); rows in order."""
        import torch

        sizes = np.array([len(ids) for ids in input_ids], dtype=np.int64)
        width = int(sizes.max())
        ids = np.full((len(input_ids), width), self.pad_id, dtype=np.int64)
        for row, tokens in enumerate(input_ids):
            ids[row, : sizes[row]] = tokens
        mask = (np.arange(width) < sizes[:, None]).astype(np.int64)
        with self._lock, torch.inference_mode():
            return self._forward(torch.from_numpy(ids), torch.from_numpy(mask))

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Micro-batches of text indices: by estimated cost once calibrated, else buckets."""
        if self.batch_overhead_tokens is None:
            return plan_micro_batches(
                lengths, max_atoms=self.micro_batch_atoms, max_tokens=self.max_batch_tokens
            )
        return plan_by_cost(
            lengths,
            max_atoms=self.micro_batch_atoms,
            max_tokens=self.max_batch_tokens,
            overhead_tokens=self.batch_overhead_tokens,
        )

    def calibrate(self) -> float:
        """Time a forward pass of a short batch and of a large one on the device and set
        `batch_overhead_tokens` from them: what the batch planner weighs padding against.
        Each shape runs `CALIBRATION_WARMUP` times first, then the median of
        `CALIBRATION_REPEATS`."""

        shapes = [CALIBRATION_SMALL, CALIBRATION_LARGE]
        batches = [[[self.pad_id + 1] * width for _ in range(rows)] for rows, width in shapes]
        for _ in range(CALIBRATION_WARMUP):
            for ids in batches:
                self.embed_batch(ids)
        seconds: list[list[float]] = [[], []]
        for _ in range(CALIBRATION_REPEATS):  # interleaved, so drift weighs on both alike
            for index, ids in enumerate(batches):
                began = time.perf_counter()
                self.embed_batch(ids)
                seconds[index].append(time.perf_counter() - began)
        small, large = (
            (rows * width, sorted(times)[len(times) // 2])
            for (rows, width), times in zip(shapes, seconds, strict=True)
        )
        self.batch_overhead_tokens = overhead_tokens(small, large, most=self.max_batch_tokens)
        log.info(
            "model %s: a forward pass costs %.2f ms for %d tokens, %.2f ms for %d; "
            "the batch planner weighs %.0f padded tokens against one more pass",
            self.name,
            small[1] * 1000,
            small[0],
            large[1] * 1000,
            large[0],
            self.batch_overhead_tokens,
        )
        return self.batch_overhead_tokens

    def embed_tokens(self, tokenized: Tokenized) -> tuple[Vectors, EmbedStats]:
        """Plan length-sorted micro-batches and run them; rows follow the input order."""
        started = time.perf_counter()
        lengths = tokenized.lengths
        batches = self.plan(lengths)
        out = np.empty((len(lengths), self.dim), dtype=np.float32)
        padded = 0
        for batch in batches:
            padded += max(lengths[i] for i in batch) * len(batch)
            out[batch] = self.embed_batch([tokenized.input_ids[i] for i in batch])
        stats = EmbedStats(
            atoms=len(lengths),
            tokens=sum(lengths),
            padded_tokens=padded,
            batches=len(batches),
            seconds=time.perf_counter() - started,
        )
        return out, stats

    def embed(self, texts: Sequence[str], *, query: bool = False) -> Vectors:
        """Tokenize and embed; convenience for queries, tests and tools."""
        vectors, _ = self.embed_tokens(self.tokenize(texts, query=query))
        return vectors

    def _forward(self, ids: Any, mask: Any) -> Vectors:
        import torch

        inputs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
        }
        if self._uses_token_types:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        hidden = self._model(**inputs).last_hidden_state.float()
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        result: Vectors = pooled.cpu().numpy().astype(np.float32, copy=False)
        return result


def check_model_source(name: str, config: ModelConfig) -> str:
    """Fail fast, before any heavy work, when a model directory is plainly unusable."""
    source = config.path or config.hf_id
    if source is None:
        raise ModelLoadError(f"model {name}: no path or hf_id configured")
    if config.path is not None and not (Path(config.path) / "config.json").is_file():
        raise ModelLoadError(
            f"model {name}: {config.path} is not a readable model directory (no config.json)"
        )
    return source


def _backend(tokenizer: Any, max_length: int) -> Any:
    """A copy of a fast tokenizer's Rust tokenizer, truncating at `max_length` (special
    tokens included) and padding nothing: what `tokenizer(texts, max_length=max_length,
    truncation=True)` computes, without the wrapper's per-text work."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.enable_truncation(
        max_length=max_length, strategy="longest_first", direction=tokenizer.truncation_side
    )
    return backend


def _ids(backend: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` (special tokens added), in one batch call of the Rust tokenizer
    (`encode_batch_fast` skips the character offsets nobody here reads)."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [encoding.ids for encoding in encode(texts, add_special_tokens=True)]


def _load(
    name: str, config: ModelConfig, device: str, dtype: str, compile: bool
) -> tuple[Any, Any]:
    """Load tokenizer and model from local files only; never download at run time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    source = check_model_source(name, config)
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
            source, use_fast=True, local_files_only=True
        )
        try:  # PyTorch's fused attention where the architecture has it
            model = AutoModel.from_pretrained(
                source, local_files_only=True, attn_implementation="sdpa"
            )
        except (ValueError, ImportError):
            model = AutoModel.from_pretrained(source, local_files_only=True)
        model.eval()
        if dtype == "auto":
            dtype = "float16" if device.startswith("cuda") else "float32"
        model.to(device=torch.device(device), dtype=getattr(torch, dtype))
        if compile:  # compiles lazily, at the first batch of each new shape family
            model = torch.compile(model, dynamic=True)
    except Exception as exc:  # a bad directory fails in many ways: one line for all of them
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model {name}: cannot load {source}: {first_line}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"model {name}: {source} has no fast tokenizer (tokenizer.json)")
    log.info("loaded model %s from %s (dim %d)", name, source, model.config.hidden_size)
    return tokenizer, model
