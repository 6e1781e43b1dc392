"""One runtime for every way of running the sampling chain, the ``Sampler``::

    from aegan_fast.sampling import Sampler
    sampler = Sampler.load("runs/x")                      # backend "auto"; or a .onnx, an OpenVINO .xml, a .plan
    sampler = Sampler.load("runs/x", "torch", "cuda", precision="bf16",   # training's --precision words
                           options=SamplerOptions(channels_last=True))    # one backend's own knobs
    images = sampler(z)                                   # z: N × z_dim in [-1, 1]; any N
    images = sampler.sample(64, seed=0)                   # the z the sample CLI draws for seed 0
    images = sampler.sample(seeds=parse_seeds("3,7,100-110"))   # one image per seed, in the list's order
    images = sampler.sample(seeds=range(16), truncation=0.7)    # z pulled toward its mean (models.truncate)

Backends (``sampler_backends()`` says which work here, and the doctor prints it):

- ``torch``: eager PyTorch on the folded SamplingChain (BatchNorm folded into the convs,
  aegan_fast.export.fold); ``SamplerOptions(fold=False)`` runs the chain of the nets as trained
  instead, through aegan_fast.ops;
- ``compile``: ``torch.compile`` of the folded chain (inductor default options, never
  ``freezing=True``, which gave wrong outputs on this family). Each new batch size is checked
  against eager on its first call; a mismatch raises instead of returning wrong images;
- ``onnxruntime``: an exported ONNX file, or a checkpoint exported on the fly; CPU provider, or
  the CUDA provider when onnxruntime has it and the device is a GPU;
- ``openvino``: an OpenVINO IR (``python -m aegan_fast.export --format openvino``), or a checkpoint
  exported once and kept beside it (``openvino/`` in its folder); CPU only, bf16 where OpenVINO's
  CPU device lists BF16 among its OPTIMIZATION_CAPABILITIES, else fp32; the compiled model is cached
  beside the IR (CACHE_DIR), so a second load is fast;
- ``tensorrt``: a serialized engine (``python -m aegan_fast.export --format tensorrt``), run with
  ``execute_async_v3`` on torch CUDA buffers on the current stream, optionally from a CUDA graph;
- ``auto`` (the default): the file's own runtime for an exported file (.onnx → onnxruntime, .xml →
  openvino, .plan → tensorrt); for a checkpoint the fastest backend that runs here, from the measured
  table AUTO_ORDER. ``sampler.description`` says which it chose and why.

``precision`` speaks training's ``--precision`` words (precision.PRECISIONS: auto, fp32, bf16, fp16).
``auto`` is each backend's own choice: bf16 for openvino where the CPU has it, the file's own for an
exported .onnx or .plan, fp32 for everything else. An explicit word a backend cannot run (fp16 on
openvino, bf16 on onnxruntime) or that contradicts an exported file's own is a UserError.
What is not precision and belongs to one backend is a field of ``SamplerOptions``.

Any batch size works: the sampler splits z into chunks of the backend's largest batch (an
engine's profile max, a fixed-batch ONNX's batch) and pads a short last chunk where the backend
needs a fixed or minimum batch. Images come back as float32 in [-1, 1] on z's device.
"""
from __future__ import annotations

import importlib.util
import logging
import platform
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .training.run_state import load_sampling_nets
from .device import pick_device
from .errors import UserError
from .export import path_kind
from .models import SamplingChain, per_seed_z, run_in_chunks, seeded_z, truncate
from .precision import DTYPES, PRECISIONS

BACKENDS = ("auto", "torch", "compile", "onnxruntime", "openvino", "tensorrt")
log = logging.getLogger(__name__)

# What ``auto`` picks for a checkpoint: the first of these that runs on the device. A measured table,
# not a measurement at load time (timing every backend at 512² costs minutes); measured: bench/RESULTS.md,
# section "Sampling 512², batch 8" (bench/bench_sampling.py). OpenVINO is first on x86 CPUs whether or not
# they have bf16 (its fp32 alone matched or beat every other CPU backend); elsewhere its CPU plugin is
# unmeasured, so it comes after compile. compile goes before onnxruntime for its batch-8 throughput,
# although its first call compiles each new batch size. On CUDA: TensorRT (fp16 engines), then compile —
# unmeasured (no GPU with TensorRT was available).
AUTO_ORDER = {"cuda": ("tensorrt", "compile", "torch"),
              "x86": ("openvino", "compile", "onnxruntime", "torch"),
              "cpu": ("compile", "openvino", "onnxruntime", "torch")}
AUTO_WHY = {"tensorrt": "TensorRT engines are the fastest on NVIDIA GPUs",
            "openvino": "OpenVINO was the fastest CPU backend measured on x86 (bf16 where the CPU has it)",
            "compile": "torch.compile was the fastest backend available here",
            "onnxruntime": "ONNX Runtime was the fastest backend available here",
            "torch": "no faster backend is available here"}
# Parity bound of torch.compile against eager, per compute dtype (images in [-1, 1]).
COMPILE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}


def sampler_backends(device: str | torch.device = "cpu") -> dict[str, str | None]:
    """{backend: None if it works here, else why not}, for ``device``."""
    device = torch.device(device)
    out: dict[str, str | None] = {"torch": None}
    if not hasattr(torch, "compile"):
        out["compile"] = "this torch has no torch.compile"
    elif device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        out["compile"] = "inductor needs a C++ compiler on CPU and none is on PATH"
    else:
        out["compile"] = None
    from .export.onnx_export import exporter
    name, detail = exporter()
    if importlib.util.find_spec("onnxruntime") is None:
        out["onnxruntime"] = "onnxruntime is not installed"
    elif name is None:
        out["onnxruntime"] = f"no ONNX exporter: {detail}"
    else:
        import onnxruntime as ort
        if device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            out["onnxruntime"] = "this onnxruntime build has no CUDAExecutionProvider (CPU provider only)"
        else:
            out["onnxruntime"] = None
    from .export.openvino_export import openvino_unavailable
    reason = openvino_unavailable()
    if reason is None and device.type != "cpu":
        reason = "OpenVINO runs on the CPU here (device cpu), not on CUDA"
    elif reason is None and name is None:
        reason = f"no ONNX exporter to build its IR from: {detail}"
    out["openvino"] = reason
    from .export.trt import tensorrt_unavailable
    out["tensorrt"] = tensorrt_unavailable()
    return out


def auto_backend(device: str | torch.device = "cpu", kind: str = "checkpoint") -> tuple[str, str]:
    """(backend, why) that ``backend="auto"`` takes for a path of ``kind`` on ``device``."""
    if kind != "checkpoint":
        backend = {"onnx": "onnxruntime", "xml": "openvino", "plan": "tensorrt"}[kind]
        return backend, f"a .{kind} file runs with {backend}"
    device = torch.device(device)
    avail = sampler_backends(device)
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    order = AUTO_ORDER["cuda" if device.type == "cuda" else "x86" if x86 else "cpu"]
    skipped = []
    for backend in order:
        if avail.get(backend) is None:
            why = AUTO_WHY[backend]
            if skipped:
                why += f" ({'; '.join(skipped)})"
            return backend, why
        skipped.append(f"{backend}: {avail[backend]}")
    raise AssertionError("the torch backend always runs")


@dataclass(frozen=True)
class SamplerOptions:
    """What one backend can be told beyond the precision; the defaults suit every backend. Setting a
    field the chosen backend does not have is a UserError (OPTION_BACKENDS says whose each is)."""
    fold: bool = True                # BatchNorm folded into the convs; False runs the nets as trained
    channels_last: bool = False      # the chain's tensors in channels_last memory format
    compile_mode: str | None = None  # a torch.compile mode (None: inductor's default)
    cuda_graph: bool = False         # replay each batch from a CUDA graph


OPTION_BACKENDS = {"fold": ("torch", "compile"), "channels_last": ("torch", "compile"),
                   "compile_mode": ("compile",), "cuda_graph": ("tensorrt",)}


def _check_options(options: SamplerOptions, backend: str) -> None:
    foreign = [f.name for f in fields(options)
               if getattr(options, f.name) != f.default and backend not in OPTION_BACKENDS[f.name]]
    if foreign:
        raise UserError(f"sampler backend {backend!r} has no option {', '.join(foreign)} ("
                        + "; ".join(f"{name}: {', '.join(OPTION_BACKENDS[name])}" for name in foreign) + ")")


def _int8_note(meta: dict) -> str:
    return f" (samples at {float(meta['int8_psnr_mean']):.1f} dB PSNR against fp32 at export)" \
        if "int8_psnr_mean" in meta else ""


def _file_precision(path: Path, own: str, precision: str) -> str:
    """An exported file's own precision; asking it for another is a UserError."""
    if precision not in ("auto", own):
        raise UserError(f"{path.name} runs in {own} (fixed at export); precision {precision!r} needs another export")
    return own


class Sampler:
    """z (N × z_dim) → images (N × 3 × R × R, float32 in [-1, 1]) with one of BACKENDS.

    Build it with ``Sampler.load``; ``sampler(z)`` for given noise, ``sampler.sample(n, seed)`` for
    the seeded noise the sample CLI draws."""

    def __init__(self, run, *, backend: str, z_dim: int, resolution: int, device: torch.device,
                 precision: str = "fp32", max_batch: int | None = None, min_batch: int = 1, denoise: bool = True,
                 description: str = "", chain: SamplingChain | None = None):
        self._run = run
        self.chain = chain  # the SamplingChain the torch/compile backends run; None for the others
        self.backend, self.z_dim, self.resolution = backend, z_dim, resolution
        self.precision = precision  # what it computes in, resolved: fp32, bf16 or fp16
        self.device, self.max_batch, self.min_batch = torch.device(device), max_batch, min_batch
        self.denoise, self.description = denoise, description

    def __repr__(self) -> str:
        return (f"Sampler(backend={self.backend!r}, R={self.resolution}, z_dim={self.z_dim}, device={self.device}, "
                f"precision={self.precision}, max_batch={self.max_batch}, {self.description})")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str | None = "auto", device: str | torch.device = "auto", *,
             precision: str = "auto", use_ema: bool = True, denoise: bool = True,
             options: SamplerOptions | None = None) -> "Sampler":
        """A sampler for ``path``: a run directory or checkpoint (backends torch, compile, onnxruntime and
        openvino — exported on the fly, openvino's kept beside the checkpoint), an ``.onnx`` file
        (onnxruntime), an OpenVINO ``.xml`` (openvino) or a TensorRT ``.plan`` (tensorrt).

        ``backend``: one of BACKENDS; "auto" (or None) is the file's runtime, or for a checkpoint the
        fastest backend that runs on ``device`` (``auto_backend``; the choice and its reason are logged
        and in ``description``). ``precision``: training's words, auto | fp32 | bf16 | fp16 (the module
        docstring says what auto means per backend). ``use_ema``: a checkpoint's EMA weights where it
        kept them; ``denoise``: run φ (an exported file has it baked in, and a mismatch is an error).
        ``options``: the backend's own knobs, a SamplerOptions."""
        path = Path(path).expanduser()
        kind = path_kind(path)
        backend = backend or "auto"
        if backend not in BACKENDS:
            raise UserError(f"unknown sampler backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if precision not in PRECISIONS:
            raise UserError(f"unknown sampler precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        if kind != "checkpoint" and not path.is_file():
            raise UserError(f"no file at {path}")
        if kind == "xml" and str(device) == "auto":
            device = "cpu"  # an OpenVINO IR runs on the CPU even where a GPU is visible
        dev = pick_device(str(device))
        chosen = ""
        if backend == "auto":
            backend, why = auto_backend(dev, kind)
            chosen = f"auto → {backend}: {why}"
        reason = sampler_backends(dev).get(backend)
        if reason:
            raise UserError(f"sampler backend {backend!r} is not available on {dev}: {reason}")
        options = options or SamplerOptions()
        _check_options(options, backend)
        sampler = cls._load(path, kind, backend, dev, precision, use_ema, denoise, options)
        if chosen:
            sampler.description = f"{sampler.description}; {chosen}"
        log.info("sampler %s: %s", backend, sampler.description)
        return sampler

    @classmethod
    def _load(cls, path, kind, backend, dev, precision, use_ema, denoise, options) -> "Sampler":
        if kind == "xml" and backend != "openvino":
            raise UserError(f"an OpenVINO IR runs with backend 'openvino', not {backend!r}")
        if backend == "openvino":
            if kind not in ("checkpoint", "xml"):
                raise UserError(f"backend 'openvino' runs an OpenVINO .xml or a checkpoint, not a .{path.suffix[1:]} "
                                f"file (`python -m aegan_fast.export --format openvino` writes one)")
            return cls._load_openvino(path, kind, dev, precision, use_ema, denoise)

        if backend in ("torch", "compile"):
            if kind != "checkpoint":
                raise UserError(f"backend {backend!r} runs a run directory or checkpoint, not a .{path.suffix[1:]} file")
            return cls._load_torch(path, backend, dev, precision, use_ema, denoise, options)
        if backend == "onnxruntime":
            if kind == "plan":
                raise UserError("a TensorRT engine runs with backend 'tensorrt', not 'onnxruntime'")
            return cls._load_onnxruntime(path, kind, dev, precision, use_ema, denoise)
        if kind != "plan":
            raise UserError(f"backend 'tensorrt' needs an engine built with `python -m aegan_fast.export --ckpt "
                            f"{path} --format tensorrt --out sampler.plan`, not {path.name}")
        return cls._load_tensorrt(path, dev, precision, denoise, options.cuda_graph)

    @classmethod
    def _load_torch(cls, path, backend, device, precision, use_ema, denoise, options):
        from .export.fold import fold_chain

        precision = "fp32" if precision == "auto" else precision
        dtype = DTYPES[precision]
        cfg, nets = load_sampling_nets(path, device, use_ema=use_ema)
        chain = SamplingChain.of(nets, denoise)
        chain = fold_chain(chain) if options.fold else chain.eval().requires_grad_(False)
        chain = chain.to(device=device, dtype=dtype)
        if options.channels_last:
            chain = chain.to(memory_format=torch.channels_last)
        desc = f"{'folded' if options.fold else 'unfolded'}, {str(dtype).removeprefix('torch.')}" + \
               (", channels_last" if options.channels_last else "")

        def eager(z):
            with torch.inference_mode():
                return chain(z.to(dtype))

        run = eager
        if backend == "compile":
            run = _ParityCheckedCompile(chain, dtype, options.compile_mode)
            desc += f", torch.compile(mode={options.compile_mode})"
        return cls(run, backend=backend, z_dim=cfg.model.z_dim, resolution=cfg.model.resolution, device=device,
                   precision=precision, denoise=denoise, description=desc, chain=chain)

    @classmethod
    def _load_openvino(cls, path, kind, device, precision, use_ema, denoise):
        import time

        from .export.openvino_export import cache_dir_for, cached_export, compile_ir, read_ir, resolve_precision

        if device.type != "cpu":
            raise UserError(f"backend 'openvino' runs on the CPU, not on {device}")
        meta = read_ir(path)[1] if kind == "xml" else {}
        int8 = meta.get("precision") == "int8"
        if int8:  # an INT8 IR is INT8 by construction (export --int8)
            precision = _file_precision(path, "int8", precision)
        else:
            precision = resolve_precision(precision)  # before any export: a bad precision fails fast
        xml = path
        if kind == "checkpoint":
            xml = cached_export(path, use_ema=use_ema, denoise=denoise)
            meta = read_ir(xml)[1]
        if (meta.get("denoise") == "True") != denoise:
            raise UserError(f"{xml.name} was exported with denoise={meta.get('denoise')}; export again to change it")
        t0 = time.perf_counter()
        try:
            compiled = compile_ir(xml, precision, cache_dir_for(xml))
        except Exception as e:
            raise UserError(f"OpenVINO cannot compile {xml}: {type(e).__name__}: {e}".splitlines()[0]) from None
        compile_s = time.perf_counter() - t0

        def run(z):
            return torch.from_numpy(compiled.infer(z.detach().to("cpu", torch.float32).contiguous().numpy()))

        from_cache = compiled.loaded_from_cache
        sampler = cls(run, backend="openvino", z_dim=int(meta["z_dim"]), resolution=int(meta["resolution"]),
                      device=device, precision=precision, denoise=denoise,
                      description=f"{precision}{' (G_E in fp32)' if compiled.split or int8 else ''}"
                                  f"{_int8_note(meta) if int8 else ''}, {xml.name}, "
                                  f"compiled in {compile_s:.1f} s"
                                  f"{' (from the cache)' if from_cache else ''}, hint {compiled.get_property('PERFORMANCE_HINT')}, "
                                  f"{compiled.get_property('NUM_STREAMS')} stream, "
                                  f"{compiled.get_property('INFERENCE_NUM_THREADS')} threads")
        sampler.ir_path, sampler.loaded_from_cache = xml, from_cache
        return sampler

    @classmethod
    def _load_onnxruntime(cls, path, kind, device, precision, use_ema, denoise):
        import numpy as np

        from .export.onnx_export import DTYPES as ONNX_DTYPES, INPUT_NAME, OUTPUT_NAME, onnx_metadata

        if kind == "checkpoint":
            from .export.onnx_export import export_checkpoint
            dtype = "fp32" if precision == "auto" else precision
            if dtype not in ONNX_DTYPES:
                raise UserError(f"backend 'onnxruntime' runs an export in {' or '.join(ONNX_DTYPES)}, not {dtype}")
            tmp = Path(tempfile.mkdtemp(prefix="aegan-onnx-"))
            onnx_path = tmp / "sampler.onnx"
            try:
                export_checkpoint(path, onnx_path, dtype=dtype, use_ema=use_ema, denoise=denoise)
                session = cls._ort_session(onnx_path, device)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # the session holds the model in memory
        else:
            onnx_path = path
            meta = onnx_metadata(path)
            if "denoise" in meta and (meta["denoise"] == "True") != denoise:
                raise UserError(f"{path.name} was exported with denoise={meta['denoise']}; export again to change it")
            session = cls._ort_session(path, device)
        inp, out = session.get_inputs()[0], session.get_outputs()[0]
        if inp.name != INPUT_NAME or out.name != OUTPUT_NAME:
            raise UserError(f"{onnx_path.name} is not an aegan_fast sampler (input {inp.name!r}, output {out.name!r})")
        z_dim, resolution = int(inp.shape[1]), int(out.shape[-1])
        in_dtype = np.float16 if "float16" in inp.type else np.float32
        precision = _file_precision(onnx_path, "fp16" if in_dtype is np.float16 else "fp32", precision)
        fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None

        def run(z):
            x = z.detach().to("cpu", torch.float32).numpy().astype(in_dtype)
            y = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            return torch.from_numpy(y.astype(np.float32, copy=False))

        providers = session.get_providers()
        return cls(run, backend="onnxruntime", z_dim=z_dim, resolution=resolution, device=device,
                   precision=precision, max_batch=fixed, min_batch=fixed or 1, denoise=denoise,
                   description=f"{np.dtype(in_dtype).name}, providers={providers}")

    @staticmethod
    def _ort_session(onnx_path, device):
        from .export.onnx_export import ort_session
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
        return ort_session(onnx_path, providers)

    @classmethod
    def _load_tensorrt(cls, path, device, precision, denoise, cuda_graph):
        from .export.trt import TensorRTRunner

        if device.type != "cuda":
            raise UserError("backend 'tensorrt' runs on a CUDA device")
        try:
            runner = TensorRTRunner(path, cuda_graph=cuda_graph, device=device)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
        info = runner.info
        if info["denoise"] != denoise:
            raise UserError(f"{path.name} was built with denoise={info['denoise']}; build it again to change it")
        return cls(runner, backend="tensorrt", z_dim=info["z_dim"], resolution=info["resolution"], device=device,
                   precision=_file_precision(path, info["dtype"], precision), max_batch=runner.max_batch,
                   min_batch=runner.min_batch, denoise=denoise,
                   description=f"TensorRT {info['tensorrt_version']}, {info['dtype']}, "
                               f"profile {info['profile']}, cuda_graph={cuda_graph}")

    # ---- running ------------------------------------------------------------------------------
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must be N × {self.z_dim}, got {tuple(z.shape)}")
        step = self.max_batch or z.shape[0] or 1
        outs = []
        for i in range(0, z.shape[0], step):
            chunk = z[i:i + step].to(self.device)
            n = chunk.shape[0]
            if n < self.min_batch:  # a fixed-batch ONNX or an engine's profile minimum: pad, then drop
                chunk = torch.cat([chunk, chunk.new_zeros(self.min_batch - n, self.z_dim)])
            outs.append(self._run(chunk)[:n].to(z.device, torch.float32))
        if not outs:
            return torch.empty(0, 3, self.resolution, self.resolution, device=z.device)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def sample(self, n: int | None = None, seed: int = 0, batch: int = 64, progress: bool = False, *,
               seeds=None, truncation: float = 1.0) -> torch.Tensor:
        """Images on the CPU. ``n`` images from the z every sampler draws for ``seed``
        (``models.seeded_z``: the images SamplingChain.sample gives for this chain), or, with
        ``seeds``, one image per seed (``models.per_seed_z``): seed 5 is the same image alone, inside
        ``0-9``, at any batch size and on every backend. ``truncation``: ψ of ``models.truncate``
        (1: none)."""
        return run_in_chunks(self, truncate(self.seed_z(n, seed, seeds), truncation), batch, progress)

    def seed_z(self, n: int | None = None, seed: int = 0, seeds=None) -> torch.Tensor:
        """The z ``sample`` draws: n rows for ``seed``, or one row per seed of ``seeds``."""
        if seeds is None:
            return seeded_z(64 if n is None else n, self.z_dim, seed)
        if n is not None:
            raise UserError("give n images of one seed, or a list of seeds, not both")
        seeds = list(seeds)
        if not seeds:
            raise UserError("the seed list is empty")
        return per_seed_z(seeds, self.z_dim)


SEED_MAX = 2 ** 63 - 1  # torch.Generator.manual_seed's range


def parse_seeds(text: str) -> list[int]:
    """``"3,7,100-110"`` → [3, 7, 100, …, 110]: comma-separated seeds and inclusive ranges, in the
    order given (repeats kept). A UserError naming the bad part otherwise."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        bounds = part.split("-")
        if not part or len(bounds) > 2 or not all(b.strip().isdigit() for b in bounds):
            raise UserError(f"--seeds {text!r}: {part!r} is not a seed or a range (write e.g. 3,7,100-110)")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if hi < lo:
            raise UserError(f"--seeds {text!r}: the range {part!r} runs backwards (write {hi}-{lo})")
        if hi > SEED_MAX:
            raise UserError(f"--seeds {text!r}: {hi} is past the largest seed, {SEED_MAX}")
        if hi - lo >= 1_000_000:
            raise UserError(f"--seeds {text!r}: the range {part!r} names more than a million images")
        seeds.extend(range(lo, hi + 1))
    return seeds


class _ParityCheckedCompile:
    """torch.compile(chain); the first call at each batch size is compared with eager and refused
    (RuntimeError) past COMPILE_TOLERANCE — compile modes have returned wrong images on this family."""

    def __init__(self, chain, dtype, mode):
        self.chain, self.dtype = chain, dtype
        self.compiled = torch.compile(chain, mode=mode, dynamic=False)
        self.checked: dict[tuple, float] = {}

    def __call__(self, z):
        z = z.to(self.dtype)
        with torch.inference_mode():
            out = self.compiled(z)
            key = tuple(z.shape)
            if key not in self.checked:
                err = (out.float() - self.chain(z).float()).abs().max().item()
                tol = COMPILE_TOLERANCE.get(self.dtype, 1e-3)
                if not err <= tol:
                    raise RuntimeError(f"torch.compile output differs from eager by {err:.3g} (> {tol}) at batch "
                                       f"{z.shape[0]}; use backend 'torch'")
                self.checked[key] = err
        return out
