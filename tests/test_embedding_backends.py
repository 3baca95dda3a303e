"""Embedding backends (torch, onnx, onnx-int8) with the real packaged model: the ONNX files exported once into the
data directory, vectors close to torch's, fingerprints per backend (torch's unchanged), and a backend change
that re-indexes by itself when the services restart."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import uuid
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sqlalchemy import text

from app.config import Settings
from app.embedding import Embedder, EmbedderPool, ModelSpec, _weights_hash, resolve_model_path, worker_embedders
from app.embedding_onnx import cpu_quantization, exported, file_hash
from app.ingest.chunk import with_context
from tests.fixtures.services import migrate, scratch_database, settings_of
from tests.test_reindex import (
    CORPUS,
    DOCS_QUERIES,
    _ingest,
    active_space,
    assert_all_vectors_in,
    cosine,
    engine_on,
    finished,
    search,
    wait_job,
    worker_and_api,
)

TEXTS = [
    "vitamin D and bone density",
    "How long should espresso extraction take?",
    "Volcanoes > Eruptions\n\nMagma rises because it is less dense than the surrounding rock; dissolved gases "
    "expand as it nears the surface and can make an eruption explosive.",
    "Diffusion tensor imaging of white matter in newborn brains shows that fractional anisotropy rises with "
    "gestational age, " * 8,
]
# Measured: onnx gives torch's vectors to float rounding (cosine 1.0000); int8 a mean of 0.995 and a minimum
# of 0.991 over 256 SciFact documents (benchmarks/embedding_backends.py).
ONNX_MIN_COSINE = 0.999
INT8_MIN_COSINE = 0.98


def before_backends(spec: ModelSpec) -> str:
    """The fingerprint as computed before backends existed (every field but the weights' hash): an install that
    keeps torch must keep it, or upgrading would re-index every collection."""
    before = {"name": spec.name, "revision": spec.revision, "dimension": spec.dimension, "pooling": spec.pooling,
              "normalize": spec.normalize, "chunk_max_tokens": spec.chunk_max_tokens,
              "chunk_overlap_tokens": spec.chunk_overlap_tokens, "chunker_version": spec.chunker_version}
    return hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:32]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-data")


@pytest.fixture(scope="module")
def torch_embedder() -> Embedder:
    return Embedder(Settings(embedding_backend="torch"))


def test_torch_fingerprint_is_unchanged(torch_embedder: Embedder) -> None:
    spec = torch_embedder.spec
    assert spec.fingerprint == before_backends(spec)
    # What the code of git cd32579 (chunker version 2) computed for the packaged model with the defaults.
    assert replace(spec, chunker_version=2).fingerprint == "9c28a222d2065407282fa264f7718c9f"
    # The stored params as before: no backend key.
    assert spec.params == {"chunk_max_tokens": 254, "chunk_overlap_tokens": 32, "chunker_version": spec.chunker_version}


@pytest.mark.parametrize(("backend", "min_cosine"), [("onnx", ONNX_MIN_COSINE), ("onnx-int8", INT8_MIN_COSINE)])
def test_onnx_backend_exports_once_and_embeds_like_torch(
    backend: str, min_cosine: float, data_dir: Path, torch_embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=data_dir, embedding_backend=backend)
    with caplog.at_level(logging.INFO, logger="app.embedding_onnx"):
        first = Embedder(settings, threads=1)
    cache = data_dir / "onnx"
    files = sorted(cache.rglob("model.onnx"))
    assert files, "nothing exported"
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app.embedding_onnx"):
        second = Embedder(settings, threads=1)
    assert not [r for r in caplog.records if "export" in r.getMessage() or "quantis" in r.getMessage()]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == stamps  # loaded, not written again
    assert not list(cache.rglob(".tmp-*"))
    variant = "fp32" if backend == "onnx" else f"int8-{cpu_quantization()}"
    [used] = cache.glob(f"*/{variant}/model.onnx")
    assert second.spec == first.spec
    assert second.onnx_file == file_hash(used)

    vectors = second.encode(TEXTS)
    reference = torch_embedder.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = (vectors * reference).sum(axis=1)
    assert cosines.min() > min_cosine, cosines

    spec = second.spec
    assert spec.backend == backend
    assert spec.params["backend"] == backend
    assert spec.params["onnx_file"] == second.onnx_file
    if backend == "onnx-int8":
        assert spec.quantization == spec.params["quantization"] == cpu_quantization()
    assert spec.fingerprint != torch_embedder.spec.fingerprint


def test_worker_processes_share_the_cores_without_oversubscribing(data_dir: Path) -> None:
    """Each worker process embeds on its share of the cores (PGSAGE_WORKER_THREADS overrides). Given them as
    intra-op threads (the API), the onnx session gets exactly that many; as lanes (the worker), each lane runs
    on one thread of one shared session."""
    cores = os.cpu_count() or 1
    assert Settings(worker_concurrency=1).worker_embed_threads == cores
    assert Settings(worker_concurrency=cores).worker_embed_threads == 1
    assert Settings(worker_concurrency=cores * 4).worker_embed_threads == 1
    assert Settings(worker_concurrency=cores, worker_threads=3).worker_embed_threads == 3
    embedder = Embedder(Settings(data_dir=data_dir, embedding_backend="onnx-int8"), threads=2)
    session = embedder.model[0].model.session
    assert session.get_session_options().intra_op_num_threads == 2
    assert embedder.lanes == 1
    before = torch.get_num_threads()
    try:
        laned = worker_embedders(Settings(data_dir=data_dir, embedding_backend="onnx-int8",
                                          worker_threads=2)).configured
        assert torch.get_num_threads() == 1  # torch only pools, inside each lane
    finally:
        torch.set_num_threads(before)
    assert laned.lanes == 2
    sessions = {id(model[0].model.session) for model in laned._lanes}
    assert len(sessions) == 1
    assert laned.model[0].model.session.get_session_options().intra_op_num_threads == 1


def test_lanes_return_every_row_in_order_as_one_lane_would(data_dir: Path) -> None:
    """A large encode run on two lanes gives each text its own vector, in the texts' order: the same
    vectors as one lane, up to int8's batch-dependent activation scales."""
    settings = Settings(data_dir=data_dir, embedding_backend="onnx-int8")
    one = Embedder(settings, threads=1)
    two = Embedder(settings, threads=2, lanes=True)
    texts = [f"{i}: {TEXTS[i % len(TEXTS)]} {'and more words ' * (i % 7)}" for i in range(80)]
    single = one.encode(texts, batch_size=8)
    laned = two.encode(texts)
    assert laned.shape == single.shape == (80, 384)
    cosines = np.sum(single * laned, axis=1)
    assert cosines.min() > 0.98
    # Each row is its own text's: nearer to it than to any other text's row.
    assert (np.argmax(laned @ single.T, axis=1) == np.arange(80)).all()
    assert two.encode(texts[:3]).shape == (3, 384)  # few texts stay on one lane
    # torch has one lane whatever it is asked: its module is not re-entrant.
    assert Embedder(Settings(embedding_backend="torch"), threads=2, lanes=True).lanes == 1


def test_fingerprints_differ_per_backend_and_file(data_dir: Path, torch_embedder: Embedder) -> None:
    onnx = Embedder(Settings(data_dir=data_dir, embedding_backend="onnx"), threads=1)
    int8 = Embedder(Settings(data_dir=data_dir, embedding_backend="onnx-int8"), threads=1)
    assert len({torch_embedder.spec.fingerprint, onnx.spec.fingerprint, int8.spec.fingerprint}) == 3
    # The exported file's hash decides too: another file under the same backend is another space.
    assert replace(onnx.spec, onnx_file="0" * 16).fingerprint != onnx.spec.fingerprint
    assert replace(torch_embedder.spec, onnx_file="0" * 16).fingerprint == before_backends(torch_embedder.spec)


def test_an_older_spaces_backend_is_rebuilt_from_its_params(data_dir: Path) -> None:
    """The pool of a process configured with torch rebuilds an onnx-int8 space's embedder (and the reverse)."""
    int8 = Embedder(Settings(data_dir=data_dir, embedding_backend="onnx-int8"), threads=1)
    pool = EmbedderPool(Settings(data_dir=data_dir, embedding_backend="torch"), threads=1)

    def space_of(e: Embedder, space_id: int) -> SimpleNamespace:
        s = e.spec
        return SimpleNamespace(id=space_id, name=s.name, revision=s.revision, weights=s.weights,
                               dimension=s.dimension, pooling=s.pooling, normalize=s.normalize,
                               params=s.params, fingerprint=s.fingerprint)

    rebuilt = pool.for_space(space_of(int8, 2))
    assert rebuilt is not pool.configured
    assert rebuilt.spec.fingerprint == int8.spec.fingerprint
    assert rebuilt.backend == "onnx-int8"
    assert np.allclose(rebuilt.encode(TEXTS), int8.encode(TEXTS), atol=1e-6)
    # A space from before backends (no backend in its params) is torch.
    assert pool.for_space(space_of(pool.configured, 1)) is pool.configured

    tampered = space_of(int8, 3)
    tampered.params = {**tampered.params, "onnx_file": "0" * 16}
    tampered.fingerprint = "f" * 32
    with pytest.raises(ValueError, match="ONNX file"):
        pool.for_space(tampered)


def test_processes_starting_together_export_once(tmp_path: Path) -> None:
    """API and worker starting at once on an empty cache: one export, the same file for both, no leftovers."""
    path = resolve_model_path("all-MiniLM-L6-v2")
    args = (path, _weights_hash(path), tmp_path, "onnx-int8", cpu_quantization())
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=exported, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    [folder] = (tmp_path / "onnx").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "fp32", f"int8-{cpu_quantization()}"]
    # The same file a later export makes (the export is deterministic), so every process gets one fingerprint.
    assert file_hash(exported(*args)) == Embedder(Settings(data_dir=tmp_path, embedding_backend="onnx-int8"),
                                                  threads=1).onnx_file


# Two restarts of a worker and the API, a re-index between: about 70 s on a quiet 2-core machine, 120 s on a busy one.
@pytest.mark.slow
def test_changing_the_backend_and_restarting_reindexes_and_switches(
    database_url: str, redis_url: str, data_dir: Path, tmp_path: Path
) -> None:
    """Acceptance 2: the quick suite's corpus under torch, then PGSAGE_EMBEDDING_BACKEND=onnx-int8 and a restart of
    the worker and the API: a re-index opens by itself, completes, and search answers from the int8 space."""
    with scratch_database(database_url) as url, engine_on(url) as engine:
        migrate(url)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PGSAGE_")},
            "PGSAGE_DATABASE_URL": url,
            "PGSAGE_REDIS_URL": redis_url,
            "PGSAGE_QUEUE_NAME": f"pgsage-backend-{uuid.uuid4().hex[:8]}",
            "PGSAGE_DATA_DIR": str(data_dir),  # the ONNX files the tests above exported, if they ran
            "PGSAGE_EMBEDDING_BACKEND": "torch",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        with worker_and_api(env, tmp_path / "worker.log") as (_, client):
            files = sorted(CORPUS.iterdir())
            for path in files:
                _ingest(client, path.name, path.read_bytes(), "docs", 1)
        old_id, old_fingerprint = active_space(engine)
        assert old_fingerprint == before_backends(Embedder(settings_of(env)).spec)

        env["PGSAGE_EMBEDDING_BACKEND"] = "onnx-int8"
        with worker_and_api(env, tmp_path / "worker.log") as (_, client):  # a restart, and no command
            job = wait_job(engine, finished, "finished", timeout=300)
            assert job["status"] == "succeeded", job
            assert job["reason"] == "detected"
            embedder = Embedder(settings_of(env), threads=1)
            new_id, new_fingerprint = active_space(engine)
            assert new_fingerprint == embedder.spec.fingerprint != old_fingerprint
            assert new_id == job["target_model_id"] != old_id
            assert_all_vectors_in(engine, new_id)
            with engine.connect() as conn:
                params = conn.execute(text("SELECT params FROM embedding_models WHERE id = :i"),
                                      {"i": new_id}).scalar_one()
                old_params = conn.execute(text("SELECT params FROM embedding_models WHERE id = :i"),
                                          {"i": old_id}).scalar_one()
            assert params["backend"] == "onnx-int8"
            assert params["onnx_file"] == embedder.onnx_file
            assert "backend" not in old_params
            for query in DOCS_QUERIES:
                space, results = search(client, "docs", query)
                assert space == {"id": new_id, "fingerprint": new_fingerprint}
                q, top = embedder.encode([query, with_context(" > ".join(results[0]["heading_path"]),
                                                             results[0]["text"])])
                # int8 quantises activations with one scale per batch, so a chunk embedded alone here differs a
                # little from the same chunk embedded among others by the worker (cosine >= 0.988 measured).
                assert results[0]["similarity"] == pytest.approx(cosine(q, top), abs=0.03)
