"""ONNX export of the folded sampling chain, checked by ``onnx.checker`` and by ONNX Runtime;
``export_checkpoint`` does all of it for a run (what ``python -m aegan_fast.export`` calls).

Exporter: torch 2.9+ defaults to the torch.export-based exporter (``dynamo=True``), which needs
onnxscript; the older TorchScript exporter is still reachable with ``dynamo=False`` in torch 2.13
but deprecated. ``exporter()`` picks the first that is available (feature detection, no version
matching). The graph has one input ``z`` (N × z_dim) and one output ``image`` (N × 3 × R × R in
[-1, 1]); N is a fixed number or a symbolic ``batch``. With ``dtype="fp16"`` the whole graph,
input and output included, is float16 (what a strongly typed TensorRT network builds from).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..checkpoint import resolve_checkpoint
from ..training.run_state import load_sampling_nets
from ..errors import CheckFailed, UserError
from ..files import sha256_file
from ..models import SamplingChain, seeded_z
from .fold import fold_chain

INPUT_NAME, OUTPUT_NAME = "z", "image"
OPSET = 18
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Validation bounds (max |onnxruntime − torch fp32| on images in [-1, 1]). fp16 keeps ~3 significant
# digits per op, and the error grows with depth: the bound holds with room on nets where every layer
# carries signal (aegan_fast.testing.lively_weights; figures in bench/RESULTS.md, "Sampling 512²,
# batch 8", fp16 ONNX export bound). 5e-2 is 6 of 255 grey levels.
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}


def exporter() -> tuple[str | None, str]:
    """(name, detail): 'dynamo' (torch.export-based, needs onnxscript), 'torchscript' (legacy), or
    None with the reason neither works here."""
    if importlib.util.find_spec("onnx") is None:
        return None, "onnx is not installed"
    if importlib.util.find_spec("onnxscript") is not None:
        return "dynamo", "torch.onnx.export(dynamo=True) via onnxscript"
    if importlib.util.find_spec("torch.onnx._internal.torchscript_exporter") is not None:
        return "torchscript", "legacy TorchScript exporter (onnxscript not installed)"
    return None, "onnxscript is not installed and this torch has no TorchScript exporter"


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and warnings meant for interactive use; keep them out."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


class ExportError(CheckFailed):
    """The export ran but its result failed a check (ONNX Runtime disagrees with torch)."""


def export_onnx(chain: SamplingChain, path: str | Path, dtype: str = "fp32",
                batch: int | None = None, opset: int = OPSET, metadata: dict | None = None) -> Path:
    """Write ``chain`` (a folded SamplingChain, ``fold_chain``; fp32, on any device) to ``path`` as
    ONNX. ``batch=None``: a dynamic batch dimension; else that fixed batch. ``metadata`` goes into the
    model's metadata_props (strings). The chain passed in is not modified."""
    import onnx

    name, detail = exporter()
    if name is None:
        raise RuntimeError(f"cannot export to ONNX: {detail}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if opset < 17:
        raise ValueError(f"opset must be ≥ 17, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(chain).cpu().to(DTYPES[dtype]).eval()
    # A dynamic batch is traced with 2 (torch.export specialises sizes 0 and 1).
    example = torch.zeros(batch or 2, chain.z_dim, dtype=DTYPES[dtype])
    with torch.no_grad(), _quiet():
        if name == "dynamo":
            shapes = None if batch else {"z": {0: torch.export.Dim("batch", min=1, max=65536)}}
            program = torch.onnx.export(model, (example,), None, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], opset_version=opset, dynamo=True,
                                        dynamic_shapes=shapes, external_data=False, verbose=False)
            program.save(str(path), external_data=False)
        else:
            axes = None if batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=False, dynamic_axes=axes)
    proto = onnx.load(str(path))
    props = {"exporter": name, "dtype": dtype, **{k: str(v) for k, v in (metadata or {}).items()}}
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **props})
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


def read_onnx(path: str | Path):
    """The ModelProto of an ONNX file; a file that is not one (truncated, another format) is a
    UserError naming it, not a protobuf traceback."""
    import onnx
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError, onnx's own errors, OSError
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None


def onnx_metadata(path: str | Path) -> dict:
    return {p.key: p.value for p in read_onnx(path).metadata_props}


def onnx_io(path: str | Path) -> dict:
    """{'inputs': [...], 'outputs': [...]}, each {'name', 'shape' (ints, or strings for symbolic dims),
    'dtype' (numpy name)} as declared in the ONNX graph."""
    from onnx import helper

    proto = read_onnx(path)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            out.append({"name": v.name, "shape": shape,
                        "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).name})
        return out

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


def ort_session(path: str | Path, providers: list[str] | None = None, threads: int | None = None):
    """An onnxruntime InferenceSession with full graph optimisation; CUDA provider first when present
    and asked for (``providers=None`` → CPU only)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.log_severity_level = 3
    available = ort.get_available_providers()
    wanted = providers or ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise RuntimeError(f"onnxruntime providers {missing} are not available here (available: {available})")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
    except Exception as e:  # onnxruntime's own error types: a graph it cannot load or run
        raise UserError(f"onnxruntime cannot load {path} ({type(e).__name__}: {str(e)[:300]})") from None


@torch.no_grad()
def validate_onnx(path: str | Path, reference: SamplingChain, dtype: str = "fp32",
                  batch: int | None = None, seed: int = 0, session=None) -> float:
    """Max |onnxruntime(z) − reference(z)| on the z drawn for ``seed``; ``reference`` (the chain as
    trained, unfolded) runs in fp32 on its own device. Raises ValueError past TOLERANCE[dtype]."""
    sess = session or ort_session(path)
    n = batch or 3  # an odd size, different from the traced one, exercises the dynamic batch
    z = seeded_z(n, reference.z_dim, seed)
    want = reference(z.to(reference.device)).float().cpu().numpy()
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: z.to(DTYPES[dtype]).numpy()})[0].astype(np.float32)
    if got.shape != want.shape:
        raise ValueError(f"ONNX output shape {got.shape} != torch {want.shape}")
    err = float(np.abs(got - want).max())
    if not np.isfinite(err) or err > TOLERANCE[dtype]:
        raise ValueError(f"ONNX Runtime disagrees with torch: max abs diff {err:.3g} > {TOLERANCE[dtype]} ({dtype})")
    return err


def export_checkpoint(ckpt, out, *, dtype: str = "fp32", batch: int | None = None, opset: int = OPSET,
                      use_ema: bool = True, denoise: bool = True) -> dict:
    """Export the sampling chain of a run directory or checkpoint to ONNX at ``out`` and validate it.
    Returns {'path', 'max_abs_diff', 'tolerance', 'exporter', 'checkpoint', 'checkpoint_sha256', 'z_dim',
    'resolution', 'denoise', 'dtype', 'batch'}. Raises UserError for a bad checkpoint, ExportError when
    ONNX Runtime disagrees with torch (the file is removed then)."""
    name, detail = exporter()
    if name is None:
        raise UserError(f"cannot export to ONNX here: {detail} (pip install -r requirements.txt)")
    ckpt_file = resolve_checkpoint(ckpt)
    cfg, nets = load_sampling_nets(ckpt_file, "cpu", use_ema=use_ema)
    m = cfg.model
    reference = SamplingChain.of(nets, denoise)
    info = {"checkpoint": str(ckpt_file), "checkpoint_sha256": sha256_file(ckpt_file), "z_dim": m.z_dim,
            "resolution": m.resolution, "denoise": denoise, "ema": use_ema, "aegan_fast": __version__}
    with torch.no_grad():
        path = export_onnx(fold_chain(reference), out, dtype=dtype, batch=batch, opset=opset, metadata=info)
        try:
            err = validate_onnx(path, reference, dtype=dtype, batch=batch)
        except ValueError as e:
            Path(path).unlink(missing_ok=True)
            raise ExportError(f"{e}; nothing written") from None
    return {**info, "path": Path(path), "max_abs_diff": err, "tolerance": TOLERANCE[dtype], "exporter": name,
            "dtype": dtype, "batch": batch}
