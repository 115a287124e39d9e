"""The processor's loaded models, loaded once on first use in a worker thread.

Each model's fingerprint (`stream.embed.fingerprint`) is hashed once, off the event loop,
before the model loads; the embedder carries it, so every output names what made it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import anyio

from stream.config import Config
from stream.embed.cores import usable_cores
from stream.embed.embedder import Embedder, check_model_source
from stream.embed.fingerprint import model_directory, model_fingerprint
from stream.errors import FingerprintMismatch, ModelLoadError


def _nothing_recorded(name: str) -> str | None:
    return None


class ModelPool:
    """Embedders by model name; `get` loads a configured model the first time it is asked."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._loaded: dict[str, Embedder] = {}
        self._fingerprints: dict[str, str] = {}
        self._recorded: Callable[[str], str | None] = _nothing_recorded
        self._lock = anyio.Lock()

    def check_against(self, recorded: Callable[[str], str | None]) -> None:
        """From now on, refuse to load a model whose fingerprint differs from `recorded(name)`
        (the control log's record; None: nothing recorded yet)."""
        self._recorded = recorded

    async def fingerprint(self, name: str) -> str:
        """The model's fingerprint, hashed once per pool in a worker thread.

        Raises `ModelLoadError` when the model is not configured or has no weights.
        """
        if name not in self._fingerprints:
            model = self._config.models.get(name)
            if model is None:
                raise ModelLoadError(f"model {name}: not configured")

            def hash_model() -> str:
                check_model_source(name, model)  # the clearer message for a bad directory
                return model_fingerprint(model_directory(name, model), model)

            self._fingerprints[name] = await anyio.to_thread.run_sync(hash_model)
        return self._fingerprints[name]

    def check(self, name: str, fingerprint: str) -> None:
        """Raise `FingerprintMismatch` when the control log has another fingerprint for `name`."""
        recorded = self._recorded(name)
        if recorded is not None and recorded != fingerprint:
            raise FingerprintMismatch(name, fingerprint, recorded)

    async def adopt(self, embedder: Embedder) -> None:
        """Serve `embedder` under its name from now on, fingerprinted as the configured
        model of that name (the bench's synthetic zero-cost model)."""
        embedder.fingerprint = await self.fingerprint(embedder.name)
        self._loaded[embedder.name] = embedder

    def loaded(self, name: str) -> Embedder | None:
        """The embedder for `name` if it is loaded already (never loads)."""
        return self._loaded.get(name)

    async def get(self, name: str) -> Embedder:
        """The embedder for `name`, loading it (off the event loop) if needed.

        Raises `ModelLoadError`, or `FingerprintMismatch` (before loading) when the weights
        differ from the ones the control log recorded under this name.
        """
        if name in self._loaded:
            return self._loaded[name]
        async with self._lock:
            if name not in self._loaded:
                # Read by oneDNN when it first builds a kernel: before any model runs.
                os.environ.setdefault(
                    "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                    str(self._config.runtime.onednn_primitive_cache),
                )
                # Unset: one thread per usable core, a container's CPU quota included
                # (torch alone counts the machine's cores).
                threads = self._config.runtime.torch_threads
                if threads is None and self._config.runtime.device == "cpu":
                    threads = await anyio.to_thread.run_sync(usable_cores)  # reads cgroup files
                if threads is not None:
                    import torch

                    torch.set_num_threads(threads)
                model = self._config.models.get(name)
                if model is None:
                    raise ModelLoadError(f"model {name}: not configured")
                fingerprint = await self.fingerprint(name)
                self.check(name, fingerprint)
                batching = self._config.batching
                try:
                    embedder = await anyio.to_thread.run_sync(
                        lambda: Embedder(
                            name,
                            model,
                            device=self._config.runtime.device,
                            dtype=self._config.runtime.dtype,
                            compile=self._config.runtime.compile,
                            micro_batch_atoms=batching.micro_batch_atoms,
                            max_batch_tokens=batching.max_batch_tokens,
                        )
                    )
                except ModelLoadError:
                    # Hashed again at the next try: the operator may fix the directory
                    # in place (then `resume` a migration that failed on it).
                    self._fingerprints.pop(name, None)
                    raise
                embedder.fingerprint = fingerprint
                if batching.planner == "cost":  # else length buckets (overhead None)
                    embedder.batch_overhead_tokens = batching.batch_overhead_tokens
                    if embedder.batch_overhead_tokens is None:
                        await anyio.to_thread.run_sync(embedder.calibrate)
                self._loaded[name] = embedder
        return self._loaded[name]
