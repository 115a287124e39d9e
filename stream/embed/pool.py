"""The processor's loaded models, loaded once on first use in a worker thread."""

from __future__ import annotations

import anyio

from stream.config import Config
from stream.embed.embedder import Embedder
from stream.errors import ModelLoadError


class ModelPool:
    """Embedders by model name; `get` loads a configured model the first time it is asked."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._loaded: dict[str, Embedder] = {}
        self._lock = anyio.Lock()

    async def get(self, name: str) -> Embedder:
        """The embedder for `name`, loading it (off the event loop) if needed."""
        if name in self._loaded:
            return self._loaded[name]
        async with self._lock:
            if name not in self._loaded:
                threads = self._config.runtime.torch_threads
                if threads is not None:
                    import torch

                    torch.set_num_threads(threads)
                model = self._config.models.get(name)
                if model is None:
                    raise ModelLoadError(f"model {name}: not configured")
                batching = self._config.batching
                self._loaded[name] = await anyio.to_thread.run_sync(
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
        return self._loaded[name]
