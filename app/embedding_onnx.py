"""The ONNX backends of the embedding model: exported once into the data directory, run by onnxruntime.

The transformer of a sentence-transformers model is exported offline from its local folder (torch's exporter,
with eager attention so that onnxruntime's BERT fusions apply: one Attention node per layer), and for onnx-int8
quantised dynamically to int8 with the settings of sentence-transformers' `export_dynamic_quantized_onnx_model`
for this CPU's instruction set. Tokenisation, pooling and normalisation stay sentence-transformers' own, so
only the transformer's arithmetic differs from the torch backend.

Not sentence-transformers' `backend="onnx"` itself: that goes through optimum-onnx, whose only release pins
transformers < 4.58, while sentence-transformers 6 needs transformers 5; the two cannot be installed together.

Files live under <data_dir>/onnx/<model>-<weights hash>/<variant>/model.onnx. An export is written to a
temporary folder and renamed into place under a file lock, so processes starting together (API, workers)
export once, and none reads half a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
QUANTIZATIONS = ("avx2", "avx512", "avx512_vnni", "arm64")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def cpu_quantization() -> str:
    """The int8 configuration for this CPU: avx512_vnni, avx512 or avx2 on x86 (from /proc/cpuinfo), arm64 on ARM."""
    if platform.machine().lower() in {"arm64", "aarch64"}:
        return "arm64"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2"
    found = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    flags = set(found.group(1).split()) if found else set()
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags and "avx512bw" in flags:
        return "avx512"
    return "avx2"


def variant_name(backend: str, quantization: str | None) -> str:
    """The cache folder of a backend: fp32, or int8-<instruction set>."""
    return "fp32" if backend == "onnx" else f"int8-{quantization}"


def file_hash(path: Path) -> str:
    """A short hash of an exported file: it decides the vectors, so it is part of the model fingerprint."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def exported(folder: str, weights: str, data_dir: Path, backend: str, quantization: str | None) -> Path:
    """The ONNX file of this model for the backend, exported (and quantised) into the data directory if absent.

    Never downloads: the model is read from its local folder."""
    root = data_dir.resolve() / "onnx" / _model_key(folder, weights)
    fp32 = root / "fp32" / ONNX_FILE
    target = root / variant_name(backend, quantization) / ONNX_FILE
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if not fp32.is_file():
            log.info("exporting the embedding model to ONNX in %s (once)", fp32.parent)
            _publish(root, fp32.parent, lambda out: _export_fp32(folder, out / ONNX_FILE))
        if not target.is_file():
            assert quantization is not None
            log.info("quantising the embedding model to int8 (%s) in %s (once)", quantization, target.parent)
            _publish(root, target.parent, lambda out: _quantize(fp32, out / ONNX_FILE, quantization))
    return target


def session(path: Path, threads: int) -> Any:
    """An onnxruntime session on the CPU with `threads` intra-op threads, one inter-op thread, no spinning."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads would otherwise spin for a while after each run, taking a core from Postgres and the
    # other process (API or worker) on a small machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def attach(model: Any, sess: Any) -> None:
    """Run the transformer of a SentenceTransformer through an onnxruntime session (one session may serve several
    models: its runs are thread-safe)."""
    transformer = _transformer(model)
    transformer.model = OnnxTransformer(sess, transformer.model.config)


def _transformer(model: Any) -> Any:
    from sentence_transformers.models import Transformer

    found = next((m for m in model if isinstance(m, Transformer)), None)
    if found is None:
        raise ValueError("the onnx embedding backends need a model with a Transformer module")
    return found


class OnnxTransformer(torch.nn.Module):
    """Stands in for the Hugging Face model inside sentence-transformers' Transformer module."""

    def __init__(self, sess: Any, config: Any) -> None:
        super().__init__()
        self.session = sess
        self.config = config
        self.device = torch.device("cpu")
        self.names = [i.name for i in sess.get_inputs()]

    def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None, **_: Any) -> dict[str, Any]:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feeds = {}
        for name in self.names:
            value = given[name]
            feeds[name] = np.zeros_like(input_ids.numpy()) if value is None else value.numpy().astype(np.int64)
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        return {"last_hidden_state": torch.from_numpy(hidden)}


def _model_key(folder: str, weights: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(folder).name or "model")[:60]
    if weights == "unknown":
        weights = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return f"{base}-{weights}"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _publish(root: Path, final: Path, write: Any) -> None:
    """Write into a temporary folder beside final, then rename it into place (atomic on one file system)."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        write(tmp)
        if not final.exists():  # else another process got there without the lock (a file system without flock)
            os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_fp32(folder: str, out: Path) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    # Eager attention traces to the MatMul/Softmax pattern onnxruntime fuses into its Attention operator.
    model = SentenceTransformer(folder, device="cpu", model_kwargs={"attn_implementation": "eager"})
    hf = _transformer(model).model.eval()
    sample = model.tokenizer(["an example sentence", "and a second, longer example sentence"], padding=True,
                             return_tensors="pt")
    names = [n for n in _INPUTS if n in sample]

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hf = hf

        def forward(self, *args: Any) -> Any:
            return self.hf(**dict(zip(names, args, strict=True)), return_dict=True).last_hidden_state

    raw = out.with_name("raw.onnx")
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapped().eval(), tuple(sample[n] for n in names), str(raw), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    config = hf.config
    if getattr(config, "model_type", "") == "bert":
        from onnxruntime.transformers.optimizer import optimize_model

        fused = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=0)
        fused.save_model_to_file(str(out))
        raw.unlink()
    else:
        raw.rename(out)


def _quantize(source: Path, out: Path, quantization: str) -> None:
    """Dynamic int8 quantisation as sentence-transformers/optimum configure it for each instruction set:
    per-channel symmetric weights (unsigned on AVX2, signed elsewhere), asymmetric unsigned activations."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown int8 configuration {quantization!r}; one of {', '.join(QUANTIZATIONS)}")
    # It advises a pre-processing pass through the root logger; the fused graph is what it should quantise.
    root = logging.getLogger()
    advice = _DropAdvice()
    root.addFilter(advice)
    try:
        quantize_dynamic(
            str(source), str(out),
            op_types_to_quantize=list(IntegerOpsRegistry.keys()),
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QUInt8 if quantization == "avx2" else QuantType.QInt8,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False, "MatMulConstBOnly": False,
                           # the fused operators are outside ONNX's shape inference; their outputs are float
                           "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.removeFilter(advice)


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")
