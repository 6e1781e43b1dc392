"""OpenVINO: the validated ONNX export converted to an OpenVINO IR (``model.xml`` + ``model.bin``),
checked against the torch nets, and compiled for the CPU in bf16 where the CPU has it.

The IR is converted from the ONNX file ``export_checkpoint`` writes (already validated against
torch by ONNX Runtime), so the two exports share one graph; the IR is then validated on its own
against the unfolded torch chain in fp32. Weights are saved in fp32 (``save_model`` would compress
them to fp16 by default). The run's facts (z_dim, resolution, denoise, checkpoint sha256, …) live
in the IR's rt_info under ``aegan_fast``, so a Sampler can check an IR without the checkpoint.

bf16 is feature-detected through OpenVINO's own ``OPTIMIZATION_CAPABILITIES`` of the CPU device
(never CPU names); the compiled blob is cached beside the IR (OpenVINO's ``CACHE_DIR``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_sampling_nets, resolve_checkpoint
from ..errors import UserError
from ..models import SamplingChain, seeded_z
from .onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, TOLERANCE, ExportError, export_checkpoint
from .trt import sha256_file

RT_KEY = "aegan_fast"
# Max |OpenVINO fp32 − torch fp32| on images in [-1, 1] at export: the ONNX bound. bf16 keeps ~3
# significant digits per op; its samples are judged by PSNR against fp32 (tests/test_openvino.py).
FP32_TOLERANCE = TOLERANCE["fp32"]
PRECISIONS = ("auto", "bf16", "fp32")
_OV_PRECISION = {"bf16": "bf16", "fp32": "f32"}


def openvino_unavailable() -> str | None:
    """None when OpenVINO loads and has its CPU device, else why not."""
    try:
        import openvino as ov
    except Exception as e:  # ImportError, or a wheel whose native libraries fail to load
        return f"openvino is not installed or does not load ({type(e).__name__}: {e})".splitlines()[0]
    try:
        devices = _core().available_devices
    except Exception as e:
        return f"openvino {ov.__version__} cannot list its devices ({type(e).__name__}: {e})".splitlines()[0]
    if "CPU" not in devices:
        return f"openvino {ov.__version__} has no CPU device here (devices: {devices})"
    return None


_CORE = None


def _core():
    global _CORE
    if _CORE is None:
        import openvino as ov
        _CORE = ov.Core()
    return _CORE


def cpu_has_bf16() -> bool:
    """OpenVINO's own answer: BF16 among the CPU device's OPTIMIZATION_CAPABILITIES."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(precision: str) -> str:
    """'auto' → 'bf16' where the CPU has it, else 'fp32'; an explicit 'bf16' the CPU lacks is an error."""
    if precision not in PRECISIONS:
        raise UserError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "bf16" and not cpu_has_bf16():
        raise UserError("OpenVINO precision bf16: this CPU does not list BF16 in OPTIMIZATION_CAPABILITIES")
    return precision


def read_ir(path: str | Path):
    """(ov.Model, its aegan_fast facts as strings) of an IR; UserError for a missing, unreadable or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no OpenVINO IR at {path}")
    if not path.with_suffix(".bin").is_file():
        raise UserError(f"{path.name} has no weights file {path.with_suffix('.bin').name} beside it")
    try:
        model = _core().read_model(str(path))
    except Exception as e:
        raise UserError(f"cannot read OpenVINO IR {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not model.has_rt_info([RT_KEY, "z_dim"]):
        raise UserError(f"{path.name} is not an aegan_fast sampler (no {RT_KEY} facts in its rt_info); "
                        f"write one with `python -m aegan_fast.export --format openvino`")
    meta = {}
    for key in ("z_dim", "resolution", "denoise", "ema", "checkpoint", "checkpoint_sha256", "aegan_fast"):
        if model.has_rt_info([RT_KEY, key]):
            meta[key] = model.get_rt_info([RT_KEY, key]).astype(str)
    names_in, names_out = model.inputs[0].get_names(), model.outputs[0].get_names()
    if INPUT_NAME not in names_in or OUTPUT_NAME not in names_out:
        raise UserError(f"{path.name} is not an aegan_fast sampler (input {sorted(names_in)}, output {sorted(names_out)})")
    return model, meta


def cache_dir_for(xml: str | Path) -> Path:
    """Where the compiled blobs of ``sampler.xml`` are cached: ``sampler.ov-cache/`` beside it."""
    xml = Path(xml)
    return xml.with_name(xml.stem + ".ov-cache")


# Performance hints, measured at 512², lively paper-size nets, on 2 cores with avx512_bf16 (no AMX),
# OpenVINO 2026.4.1, medians of 3 rounds interleaved (/tmp helper script, 2026-12-02):
# see HINTS_MEASURED in the Sampler; the single-request LATENCY configuration (1 stream, every core)
# was the fastest for batch 8 too, so one compiled model serves both.
COMPILE_CONFIG = {"PERFORMANCE_HINT": "LATENCY"}


def compile_ir(model, precision: str, cache_dir: Path | None = None, threads: int | None = None):
    """``model`` (an ov.Model, or an IR's path: then a cached blob is found without reading the IR)
    compiled for the CPU at ``precision`` ('bf16' | 'fp32', already resolved)."""
    config = {**COMPILE_CONFIG, "INFERENCE_PRECISION_HINT": _OV_PRECISION[precision],
              "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        except OSError:
            pass  # a read-only place: compile every time rather than fail
    return _core().compile_model(str(model) if isinstance(model, Path) else model, "CPU", config)


def run_compiled(compiled, z: np.ndarray) -> np.ndarray:
    return compiled.create_infer_request().infer({0: z})[0]


def save_ir(model, out: Path) -> None:
    """Write model.xml + model.bin with fp32 weights, both replaced at once as far as a filesystem allows
    (written in a temporary folder beside ``out``, the .bin moved first)."""
    import openvino as ov

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", dir=out.parent))
    try:
        ov.save_model(model, str(tmp / out.name), compress_to_fp16=False)
        os.replace(tmp / out.with_suffix(".bin").name, out.with_suffix(".bin"))
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def validate_ir(compiled, reference: SamplingChain, seed: int = 0, n: int = 3) -> float:
    """Max |OpenVINO(z) − reference(z)| on the z drawn for ``seed`` (reference: the unfolded chain, fp32)."""
    z = seeded_z(n, reference.z_dim, seed)
    want = reference(z).float().numpy()
    got = run_compiled(compiled, z.numpy())
    if got.shape != want.shape:
        raise ValueError(f"OpenVINO output shape {got.shape} != torch {want.shape}")
    return float(np.abs(got - want).max())


def export_openvino(ckpt, out, *, use_ema: bool = True, denoise: bool = True, opset: int = OPSET) -> dict:
    """Export a run directory or checkpoint to an OpenVINO IR at ``out`` (a .xml; the .bin goes beside it):
    the validated fp32 ONNX export, converted, checked in fp32 against the torch nets. Returns
    export_checkpoint's report with 'path' (the .xml), 'onnx_max_abs_diff' and 'max_abs_diff' (OpenVINO's).
    Raises UserError without openvino, ExportError (nothing written) when OpenVINO disagrees with torch."""
    reason = openvino_unavailable()
    if reason:
        raise UserError(f"cannot export to OpenVINO: {reason} (pip install -r requirements.txt)")
    import openvino as ov

    out = Path(out)
    if out.suffix.lower() != ".xml":
        raise UserError(f"{out}: an OpenVINO IR ends in .xml")
    ckpt_file = resolve_checkpoint(ckpt)
    with tempfile.TemporaryDirectory(prefix="aegan-ov-") as tmp:
        rep = export_checkpoint(ckpt_file, Path(tmp) / "sampler.onnx", dtype="fp32", opset=opset,
                                use_ema=use_ema, denoise=denoise)
        model = ov.convert_model(str(rep["path"]))
    for key in ("z_dim", "resolution", "denoise", "ema", "checkpoint", "checkpoint_sha256", "aegan_fast"):
        model.set_rt_info(str(rep[key]), [RT_KEY, key])
    _, nets = load_sampling_nets(ckpt_file, "cpu", use_ema=use_ema)
    err = validate_ir(compile_ir(model, "fp32"), SamplingChain.of(nets, denoise))
    if not np.isfinite(err) or err > FP32_TOLERANCE:
        raise ExportError(f"OpenVINO disagrees with torch: max abs diff {err:.3g} > {FP32_TOLERANCE} (fp32); "
                          f"nothing written")
    save_ir(model, out)
    return {**rep, "path": out, "onnx_max_abs_diff": rep["max_abs_diff"], "max_abs_diff": err,
            "tolerance": FP32_TOLERANCE}


def cached_export(ckpt, *, use_ema: bool = True, denoise: bool = True) -> Path:
    """The IR of a checkpoint, exported once and kept beside it in ``openvino/sampler-{ema,raw}[-nodenoise].xml``
    (one slot per folder, so pruned periodic checkpoints leave nothing behind), exported again, with its
    compiled-blob cache cleared, when the checkpoint there is another one (the IR holds its sha256)."""
    ckpt_file = resolve_checkpoint(ckpt)
    name = "sampler-" + ("ema" if use_ema else "raw") + ("" if denoise else "-nodenoise") + ".xml"
    xml = ckpt_file.parent / "openvino" / name
    sha = sha256_file(ckpt_file)
    if xml.is_file():
        try:
            _, meta = read_ir(xml)
            if meta.get("checkpoint_sha256") == sha:
                return xml
        except UserError:
            pass  # a broken or foreign file where the cache should be: export again over it
    export_openvino(ckpt_file, xml, use_ema=use_ema, denoise=denoise)
    shutil.rmtree(cache_dir_for(xml), ignore_errors=True)  # blobs of the previous IR
    return xml
