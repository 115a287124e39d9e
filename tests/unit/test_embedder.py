"""The embedder: parity with Hugging Face's reference vectors, truncation, batching invariance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.config import ModelConfig, load_config
from stream.embed.embedder import Embedder
from stream.errors import ModelLoadError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "embed_parity_v1"


@pytest.fixture(scope="module")
def tiny(tiny_model: Path) -> Embedder:
    return Embedder("tiny", ModelConfig(path=str(tiny_model), max_tokens=32), micro_batch_atoms=4)


@pytest.mark.slow
def test_minilm_reproduces_reference_vectors_and_token_ids() -> None:
    fixtures = json.loads((FIXTURES / "all_minilm_l6_v2.json").read_text())
    embedder = Embedder("minilm", load_config(None, {}).models["minilm"])
    texts = [f["input"] for f in fixtures]
    assert embedder.tokenize(texts).input_ids == [f["input_ids"] for f in fixtures]
    vectors = embedder.embed(texts)
    reference = np.array([f["embedding"] for f in fixtures], dtype=np.float32)
    assert vectors.shape == (len(fixtures), 384)
    assert float(np.abs(vectors - reference).max()) < 1e-5
    long_case = json.loads((FIXTURES / "long_input_case.json").read_text())
    tokens = embedder.tokenize([long_case["input"]])
    assert tokens.overlong == [True] and tokens.lengths == [256]


def test_truncation_counts_special_tokens_and_prefix(tiny_model: Path) -> None:
    plain = Embedder("t", ModelConfig(path=str(tiny_model), max_tokens=8))
    prefixed = Embedder(
        "t", ModelConfig(path=str(tiny_model), max_tokens=8, document_prefix="doc: ")
    )
    six_words = "one two three four five six"
    assert plain.tokenize([six_words]).lengths == [8] and plain.tokenize([six_words]).overlong == [
        False
    ]
    cut = prefixed.tokenize([six_words])
    assert cut.overlong == [True] and cut.lengths == [8]
    assert cut.input_ids[0][-1] == plain.tokenize([six_words]).input_ids[0][-1], "ends with [SEP]"
    assert prefixed.tokenize([six_words], query=True).overlong == [False]


def test_rows_do_not_depend_on_batching_or_order(tiny: Embedder) -> None:
    texts = ["short", "a somewhat longer sentence about streams", "mid length text", "x y"] * 3
    together = tiny.embed(texts)
    one_by_one = np.vstack([tiny.embed([t]) for t in texts])
    assert np.allclose(together, one_by_one, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    _, stats = tiny.embed_tokens(tiny.tokenize(texts))
    assert stats.batches == 3 and stats.atoms == 12


def test_cls_pooling_and_no_normalization(tiny_model: Path) -> None:
    raw = Embedder("t", ModelConfig(path=str(tiny_model), pooling="cls", normalize=False))
    vectors = raw.embed(["alpha", "beta gamma"])
    assert vectors.shape == (2, 32) and not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)


def test_unreadable_model_directory_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        ModelLoadError, match=r"is not a readable model directory \(no config.json\)"
    ):
        Embedder("m", ModelConfig(path=str(tmp_path / "missing")))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"^model m: cannot load"):
        Embedder("m", ModelConfig(path=str(tmp_path)))


def test_nothing_to_embed_is_an_empty_result(tiny: Embedder) -> None:
    tokens = tiny.tokenize([])
    assert tokens.input_ids == [] and tokens.overlong == []
    vectors, stats = tiny.embed_tokens(tokens)
    assert vectors.shape == (0, 32) and stats.atoms == 0 and stats.batches == 0


@settings(max_examples=300, deadline=None)
@given(
    texts=st.lists(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=400)
        | st.text("ab é\u00a0\t\n.,!中文😀", min_size=1, max_size=400),
        min_size=1,
        max_size=6,
    ),
    max_tokens=st.integers(min_value=3, max_value=40),
)
def test_tokenize_equals_the_transformers_call_it_replaces(
    tiny_model: Path, texts: list[str], max_tokens: int
) -> None:
    """The Rust tokenizer used directly gives what `tokenizer(texts, max_length=...,
    truncation=True)` gives, overlong texts and their cut included."""
    embedder = _embedders(tiny_model, max_tokens)
    prefixed = ["doc: " + text for text in texts]
    wrapper = embedder._tokenizer
    full = wrapper(prefixed, add_special_tokens=True, return_attention_mask=False)["input_ids"]
    cut = wrapper(prefixed, max_length=max_tokens, truncation=True, add_special_tokens=True)
    tokens = embedder.tokenize(texts)
    assert tokens.input_ids == cut["input_ids"]
    assert tokens.overlong == [len(ids) > max_tokens for ids in full]


_made: dict[tuple[Path, int], Embedder] = {}


def _embedders(model: Path, max_tokens: int) -> Embedder:
    """One embedder per window size (Hypothesis calls the test hundreds of times)."""
    key = (model, max_tokens)
    if key not in _made:
        config = ModelConfig(path=str(model), max_tokens=max_tokens, document_prefix="doc: ")
        _made[key] = Embedder("t", config)
    return _made[key]
