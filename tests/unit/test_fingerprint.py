"""Model fingerprints: what changes them and what does not."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgspec
import pytest

from stream.config import ModelConfig
from stream.embed.fingerprint import model_fingerprint
from stream.errors import ModelLoadError


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text('{"hidden_size": 4}')
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 5000)
    (directory / "tokenizer.json").write_text('{"vocab": 1}')
    (directory / "README.md").write_text("docs")
    return directory


def test_same_files_and_settings_give_the_same_fingerprint_anywhere(
    model_dir: Path, tmp_path: Path
) -> None:
    config = ModelConfig(path=str(model_dir))
    first = model_fingerprint(model_dir, config)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    assert model_fingerprint(copy, msgspec.structs.replace(config, path=str(copy))) == first


@pytest.mark.parametrize(
    "change",
    [
        {"pooling": "cls"},
        {"normalize": False},
        {"max_tokens": 128},
        {"query_prefix": "query: "},
        {"document_prefix": "passage: "},
    ],
)
def test_every_vector_shaping_setting_changes_it(
    model_dir: Path, change: dict[str, object]
) -> None:
    config = ModelConfig(path=str(model_dir))
    changed = msgspec.structs.replace(config, **change)
    assert model_fingerprint(model_dir, changed) != model_fingerprint(model_dir, config)


def test_new_weights_or_tokenizer_change_it_but_docs_do_not(model_dir: Path) -> None:
    config = ModelConfig(path=str(model_dir))
    before = model_fingerprint(model_dir, config)
    (model_dir / "README.md").write_text("other docs")
    assert model_fingerprint(model_dir, config) == before
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 1  # one bit, same size: the cache (size, mtime) must not hide it
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a later write
    after_weights = model_fingerprint(model_dir, config)
    assert after_weights != before
    (model_dir / "tokenizer.json").write_text('{"vocab": 2}')
    assert model_fingerprint(model_dir, config) not in (before, after_weights)


def test_a_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weights"):
        model_fingerprint(tmp_path, ModelConfig(path=str(tmp_path)))
