"""Deployment of the sampling chain: the folded inference graph, ONNX export, TensorRT engines.

    python -m aegan_fast.export --ckpt RUN_DIR --format onnx --out sampler.onnx [--dtype fp16] [--batch N]
    python -m aegan_fast.export --ckpt RUN_DIR --format tensorrt --out sampler.plan

- ``fold``: a SamplingChain over copies of the nets with BatchNorm folded into the convs, dropout
  removed, no custom ops (``fold_chain``);
- ``onnx_export``: torch → ONNX (opset ≥ 17), onnx.checker, ONNX Runtime validation, and
  ``export_checkpoint`` (a run → a validated ONNX file);
- ``trt``: TensorRT engine build, JSON sidecar, runtime;
- ``cli``: the command line only. Running any of them: ``aegan_fast.sampling.Sampler``.
"""
from .fold import fold_batchnorm, fold_chain

__all__ = ["fold_batchnorm", "fold_chain"]
