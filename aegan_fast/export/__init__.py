"""Deployment of the sampling chain: the folded inference graph, ONNX export, TensorRT engines.

    python -m aegan_fast.export --ckpt RUN_DIR --format onnx --out sampler.onnx [--dtype fp16] [--batch N]
    python -m aegan_fast.export --ckpt RUN_DIR --format tensorrt --out sampler.plan

- ``fold``: a SamplingChain over copies of the nets with BatchNorm folded into the convs, dropout
  removed, no custom ops (``fold_chain``);
- ``onnx_export``: torch → ONNX (opset ≥ 17), onnx.checker, ONNX Runtime validation, and
  ``export_checkpoint`` (a run → a validated ONNX file);
- ``openvino_export``: ONNX → OpenVINO IR (bf16 inference where the CPU has it) and its compiled model;
- ``trt``: TensorRT engine build, JSON sidecar, runtime;
- ``cli``: the command line only. Running any of them: ``aegan_fast.sampling.Sampler``.
"""
from pathlib import Path

from .fold import fold_batchnorm, fold_chain

# The suffixes of each kind of exported file: an ONNX graph, an OpenVINO IR, a TensorRT engine.
SUFFIXES = {"onnx": (".onnx",), "xml": (".xml",), "plan": (".plan", ".engine", ".trt")}


def path_kind(path: str | Path) -> str:
    """'onnx', 'xml' (an OpenVINO IR), 'plan' (a TensorRT engine) or 'checkpoint' (a run directory or
    checkpoint file), by the path's suffix (SUFFIXES)."""
    suffix = Path(path).suffix.lower()
    return next((kind for kind, suffixes in SUFFIXES.items() if suffix in suffixes), "checkpoint")


__all__ = ["SUFFIXES", "fold_batchnorm", "fold_chain", "path_kind"]
