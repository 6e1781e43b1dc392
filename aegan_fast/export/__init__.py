"""Deployment of the sampling chain: the folded inference graph, ONNX export, TensorRT engines.

    python -m aegan_fast.export --ckpt RUN_DIR --format onnx --out sampler.onnx [--dtype fp16] [--batch N]
    python -m aegan_fast.export --ckpt RUN_DIR --format tensorrt --out sampler.plan

- ``fold``: BatchNorm folded into the convs, dropout removed, no custom ops (``build_inference_graph``);
- ``onnx_export``: torch → ONNX (opset ≥ 17), onnx.checker, ONNX Runtime validation;
- ``trt``: TensorRT engine build, JSON sidecar, runtime;
- ``cli``: the command line. Running any of them: ``aegan_fast.sample.Sampler``.
"""
from .fold import SamplingGraph, build_inference_graph, fold_batchnorm

__all__ = ["SamplingGraph", "build_inference_graph", "fold_batchnorm"]
