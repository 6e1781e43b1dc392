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

from ..checkpoint import resolve_checkpoint
from ..training.run_state import load_sampling_nets
from ..errors import UserError
from ..files import sha256_file
from ..models import SamplingChain, seeded_z
from . import path_kind
from .onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, TOLERANCE, ExportError, export_checkpoint

RT_KEY = "aegan_fast"
# Max |OpenVINO fp32 − torch fp32| on images in [-1, 1] at export: the ONNX bound. bf16 keeps ~3
# significant digits per op; its samples are judged by PSNR against fp32 (tests/test_openvino.py).
FP32_TOLERANCE = TOLERANCE["fp32"]
PRECISIONS = ("auto", "bf16", "fp32")  # the words of precision.PRECISIONS that OpenVINO's CPU runs
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
    for key in ("z_dim", "resolution", "denoise", "ema", "checkpoint", "checkpoint_sha256", "aegan_fast",
                "precision", "int8_psnr_mean", "int8_psnr_min"):
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


# One LATENCY model with a dynamic batch on every core serves batch 1 and batch 8 alike: a fixed batch or
# a batch split over THROUGHPUT streams gained no more than the run-to-run spread, at the price of a compile
# per batch size, and the default THROUGHPUT hint with one request gives each stream one core (measured:
# bench/RESULTS.md, section "OpenVINO performance hints"). INFERENCE_NUM_THREADS follows torch's thread count.
COMPILE_CONFIG = {"PERFORMANCE_HINT": "LATENCY"}


def _embedding_cut(model):
    """G_E's output (its final tanh: the first Tanh of the chain, N × C × R/16 × R/16), or None."""
    res = int(model.get_rt_info([RT_KEY, "resolution"]).astype(str)) if model.has_rt_info([RT_KEY, "resolution"]) else None
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Tanh":
            shape = op.get_output_partial_shape(0)
            if res and shape.rank.get_length() == 4 and shape[2].is_static and shape[2].get_length() == res // 16:
                return op
            return None
    return None


def _split_at_embedding(model):
    """(z → embedding, embedding → image) sub-models of the chain, or None when no cut is found."""
    import openvino as ov

    if _embedding_cut(model) is None:
        return None
    head_src = model.clone()
    cut = _embedding_cut(head_src)
    head = ov.Model([ov.opset13.result(cut.output(0))], head_src.get_parameters(), "G_E")
    tail_src = model.clone()
    cut = _embedding_cut(tail_src)
    emb = ov.opset13.parameter(cut.output(0).get_partial_shape(), ov.Type.f32, name="embedding")
    for target in list(cut.output(0).get_target_inputs()):
        target.replace_source_output(emb.output(0))
    return head, ov.Model(tail_src.get_results(), [emb], "F_phi")


def _bf16_out(model):
    """The same model with a bf16 output tensor: OpenVINO's CPU plugin keeps the graph's tail after the
    last Convolution in fp32 unless the output is bf16 itself, which here was φ's whole ConvTranspose
    decoder: the largest part of a 512² sample's time (bench/RESULTS.md, "OpenVINO performance hints")."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    ppp.output(0).tensor().set_element_type(ov.Type.bf16)
    return ppp.build()


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    """OpenVINO hands bf16 out as 16-bit words (shown as float16): widen them to the float32 they are."""
    return (np.ascontiguousarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


class CompiledChain:
    """The chain compiled for the CPU. fp32: one model. bf16: G_E in fp32 (0.7 of 49 GFLOP at 512²)
    and F∘φ in bf16 with a bf16 output — with G_E in bf16 too its 2 % embedding error took the 512²
    samples to 27.5 dB PSNR against fp32 (lively nets); with G_E in fp32 they are at 36–38.5 dB, within
    the ≥ 35 dB bound. ``infer(z)`` takes and returns float32 numpy arrays (a fresh output each call)."""

    def __init__(self, model, precision: str, cache_dir: Path | None = None, threads: int | None = None):
        self.precision, self.tail_precision = precision, None
        config = {**COMPILE_CONFIG, "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        if cache_dir is not None:
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache_dir)
            except OSError:
                pass  # a read-only place: compile every time rather than fail
        core = _core()
        if precision == "int8":
            # The quantized convs run in INT8 whatever the hint. G_E (left out by NNCF) runs in fp32 as
            # in bf16; the decoder's unquantized rest (the last conv, the activations between the INT8
            # convs) in bf16 where the CPU has it, with a bf16 output: 1.5× the speed of an all-fp32
            # rest at 512² (bench/RESULTS.md, "An INT8 sampler").
            model = core.read_model(str(model)) if isinstance(model, Path) else model
            halves = _split_at_embedding(model)
            self.split = halves is not None
            head, tail = halves if halves else (None, model)
            rest = "bf16" if cpu_has_bf16() else "f32"
            self.tail_precision = rest
            self.parts = ([core.compile_model(head, "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"})] if head
                          else []) + [core.compile_model(_bf16_out(tail) if rest == "bf16" else tail, "CPU",
                                                         {**config, "INFERENCE_PRECISION_HINT": rest})]
        elif precision == "fp32":
            # From the IR's path a cached blob is found without reading the IR.
            self.parts = [core.compile_model(str(model) if isinstance(model, Path) else model, "CPU",
                                             {**config, "INFERENCE_PRECISION_HINT": "f32"})]
            self.split = False
        else:
            model = core.read_model(str(model)) if isinstance(model, Path) else model
            halves = _split_at_embedding(model)
            self.split = halves is not None
            head, tail = halves if halves else (None, model)
            self.parts = ([core.compile_model(head, "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"})] if head
                          else []) + [core.compile_model(_bf16_out(tail), "CPU", {**config, "INFERENCE_PRECISION_HINT": "bf16"})]
        self.requests = [c.create_infer_request() for c in self.parts]

    def infer(self, z: np.ndarray) -> np.ndarray:
        x = z
        for request in self.requests:
            # share_outputs=False (the default) copies: a request reuses its output buffer on the next call
            x = request.infer({0: x}, share_outputs=False)[0]
        bf16_out = self.precision == "bf16" or (self.precision == "int8" and self.tail_precision == "bf16")
        return _bf16_to_f32(x) if bf16_out else x

    def get_property(self, name: str):
        return self.parts[-1].get_property(name)

    @property
    def loaded_from_cache(self) -> bool:
        return all(bool(c.get_property("LOADED_FROM_CACHE")) for c in self.parts)


def compile_ir(model, precision: str, cache_dir: Path | None = None, threads: int | None = None) -> CompiledChain:
    """``model`` (an ov.Model or an IR's path) compiled for the CPU at ``precision`` ('bf16' | 'fp32',
    already resolved; 'int8' for an INT8 IR), the blobs cached in ``cache_dir`` when given."""
    return CompiledChain(model, precision, cache_dir, threads)


def run_compiled(compiled: CompiledChain, z: np.ndarray) -> np.ndarray:
    return compiled.infer(z)


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


# INT8 (``export --format openvino --int8``): post-training quantization by NNCF of the decoder F∘φ, the
# bulk of a sample's multiply-adds; G_E (cheap, and the one whose rounding the samples feel most: see
# CompiledChain) and the last conv (it writes the pixels) stay in fp32. An export whose samples are not
# within INT8_MIN_PSNR_DB of the fp32 IR's on average (per image, seeded z) is refused.
INT8_MIN_PSNR_DB = 30.0
INT8_CHECK_N = 16          # seeded samples compared with the fp32 IR at export
CALIBRATION_N = 128        # seeded z for NNCF's statistics (random z is the sampler's whole input distribution)


def nncf_unavailable() -> str | None:
    import importlib.util
    if importlib.util.find_spec("nncf") is None:
        return "NNCF is not installed (pip install -r requirements.txt installs nncf)"
    return None


def quantize_int8(model, z_dim: int, calibration_n: int = CALIBRATION_N):
    """``model`` (the fp32 chain IR) with F∘φ quantized to INT8 by NNCF, calibrated on seeded z;
    G_E's ops and the last convolution are left out (kept in fp32)."""
    import logging

    import nncf

    halves = _split_at_embedding(model)
    if halves is None:
        raise UserError("cannot find the embedding (G_E's tanh) in this IR: INT8 keeps G_E in fp32 and needs it")
    head_ops = [op.get_friendly_name() for op in halves[0].get_ordered_ops()
                if op.get_type_name() not in ("Parameter", "Result", "Constant")]
    convs = [op.get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() in ("Convolution", "ConvolutionBackpropData")]
    batches = [seeded_z(min(8, calibration_n - i), z_dim, 10_000 + i).numpy() for i in range(0, calibration_n, 8)]
    logging.getLogger("nncf").setLevel(logging.WARNING)
    return nncf.quantize(model, nncf.Dataset(batches), subset_size=calibration_n,
                         preset=nncf.QuantizationPreset.MIXED,
                         ignored_scope=nncf.IgnoredScope(names=head_ops + convs[-1:], validate=False))


def int8_quality(quantized, fp32_model, z_dim: int, n: int = INT8_CHECK_N) -> dict:
    """Per-image PSNR (dB, images in [-1, 1]) of the INT8 chain's samples against the fp32 IR's, on the
    z drawn for seed 0."""
    z = seeded_z(n, z_dim, 0).numpy()
    want = compile_ir(fp32_model, "fp32").infer(z)
    got = compile_ir(quantized, "int8").infer(z)
    mse = ((got.astype(np.float64) - want) ** 2).reshape(n, -1).mean(1)
    psnr = 10 * np.log10(4.0 / np.maximum(mse, 1e-20))
    return {"psnr_mean": float(psnr.mean()), "psnr_min": float(psnr.min()), "n": n}


def export_openvino(ckpt, out, *, use_ema: bool = True, denoise: bool = True, opset: int = OPSET,
                    int8: bool = False, min_psnr_db: float = INT8_MIN_PSNR_DB,
                    calibration_n: int = CALIBRATION_N) -> dict:
    """Export a run directory or checkpoint to an OpenVINO IR at ``out`` (a .xml; the .bin goes beside it):
    the validated fp32 ONNX export, converted, checked in fp32 against the torch nets. Returns
    export_checkpoint's report with 'path' (the .xml), 'onnx_max_abs_diff' and 'max_abs_diff' (OpenVINO's).
    Raises UserError without openvino, ExportError (nothing written) when OpenVINO disagrees with torch.
    ``int8``: F∘φ quantized by NNCF (``quantize_int8``), refused (ExportError, nothing written) when its
    samples' mean PSNR against the fp32 IR's is under ``min_psnr_db``; the report gains 'int8'."""
    reason = openvino_unavailable() or (nncf_unavailable() if int8 else None)
    if reason:
        raise UserError(f"cannot export to OpenVINO{' INT8' if int8 else ''}: {reason} (pip install -r requirements.txt)")
    import openvino as ov

    out = Path(out)
    if path_kind(out) != "xml":
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
    extra = {}
    if int8:
        quantized = quantize_int8(model, int(rep["z_dim"]), calibration_n)
        quality = int8_quality(quantized, model, int(rep["z_dim"]))
        if not quality["psnr_mean"] >= min_psnr_db:
            raise ExportError(f"INT8 samples are at {quality['psnr_mean']:.1f} dB PSNR against fp32 on average "
                              f"(min {quality['psnr_min']:.1f}), under the {min_psnr_db:g} dB bound; nothing written")
        for key, value in {**quality, "precision": "int8", "min_psnr_db": min_psnr_db}.items():
            quantized.set_rt_info(str(value), [RT_KEY, f"int8_{key}" if key != "precision" else key])
        model, extra = quantized, {"int8": quality}
    save_ir(model, out)
    return {**rep, "path": out, "onnx_max_abs_diff": rep["max_abs_diff"], "max_abs_diff": err,
            "tolerance": FP32_TOLERANCE, **extra}


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
