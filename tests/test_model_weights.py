"""Issue 11, defect 5: a space's model is rebuilt only from the weights the space was built with.

A space records the model's name and revision; rebuilding it (the old space's model during a re-index or
after a rollback, for queries and writes) used to trust that record, so weights changed in place at the
same path were loaded and their vectors mixed into the old space. The weights are hashed when a space's
model is rebuilt and refused when they differ (for_space raises; the question path turns that into a 503
with the reason, and ingest leaves that space to the re-index).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from app.config import Settings
from app.embedding import Embedder, EmbedderPool, resolve_model_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the packaged model, so its weights can be changed in place."""
    folder = tmp_path_factory.mktemp("model") / "minilm"
    shutil.copytree(resolve_model_path("all-MiniLM-L6-v2"), folder)
    return folder


def _settings(model: Path, **more: Any) -> Settings:
    return Settings(embedding_model=str(model), **more)


def _space(embedder: Embedder, space_id: int = 7) -> SimpleNamespace:
    """The registry row of a space built with this embedder (what spaces.register stores)."""
    spec = embedder.spec
    return SimpleNamespace(id=space_id, name=spec.name, revision=spec.revision, dimension=spec.dimension,
                           pooling=spec.pooling, normalize=spec.normalize, params=spec.params,
                           fingerprint=spec.fingerprint, weights=spec.weights)


def _change_weights_in_place(folder: Path) -> None:
    """Noise on one attention matrix of the model's weight file (as a fine-tune saved over it would)."""
    path = max(folder.rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    tensors = load_file(str(path))
    name = next(k for k, v in tensors.items() if v.ndim == 2 and "attention" in k)
    noise = np.random.default_rng(0).normal(0, 0.05, tensors[name].shape).astype(np.float32)
    tensors[name] = tensors[name] + noise
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_a_space_whose_weights_changed_in_place_is_refused(model_dir: Path) -> None:
    built = Embedder(_settings(model_dir))
    old_space = _space(built)
    question = ["when did the first transatlantic cable open"]
    before = built.encode(question)
    del built

    _change_weights_in_place(model_dir)

    # A process configured with another chunk size (so the old space is not its own) rebuilds the old space.
    pool = EmbedderPool(_settings(model_dir, chunk_max_tokens=128))
    assert pool.configured.spec.fingerprint != old_space.fingerprint
    assert not np.allclose(pool.configured.encode(question), before, atol=1e-4), "the weights did not change"
    with pytest.raises(ValueError, match="weights"):
        pool.for_space(old_space)


def test_an_explicit_revision_label_does_not_hide_changed_weights(tmp_path: Path, model_dir: Path) -> None:
    """With PGSAGE_EMBEDDING_REVISION set, the fingerprint stays the same when the weights change: the
    configured model itself must not serve (or write to) the space built with the old weights.

    The torch backend: with the onnx ones the exported file's hash is in the fingerprint, so new weights give
    a new fingerprint (and a re-index) even under a label."""
    folder = tmp_path / "labelled"
    shutil.copytree(model_dir, folder)
    built = Embedder(_settings(folder, embedding_revision="v1", embedding_backend="torch"))
    space = _space(built)
    del built
    _change_weights_in_place(folder)

    pool = EmbedderPool(_settings(folder, embedding_revision="v1", embedding_backend="torch"))
    assert pool.configured.spec.fingerprint == space.fingerprint
    with pytest.raises(ValueError, match="weights"):
        pool.for_space(space)


def test_unchanged_weights_rebuild(tmp_path: Path, model_dir: Path) -> None:
    built = Embedder(_settings(model_dir))
    space = _space(built)
    pool = EmbedderPool(_settings(model_dir, chunk_max_tokens=128))
    rebuilt = pool.for_space(space)
    question = ["what is the capital of Australia"]
    assert np.allclose(rebuilt.encode(question), built.encode(question), atol=1e-6)
