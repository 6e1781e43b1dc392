"""One runtime for every way of running the sampling chain, the ``Sampler``::

    from aegan_fast.sampling import Sampler
    sampler = Sampler.load("runs/x", backend="compile")   # or a .onnx file, or a TensorRT .plan
    images = sampler(z)                                   # z: N × z_dim in [-1, 1]; any N
    images = sampler.sample(64, seed=0)                   # the z the sample CLI draws for seed 0

Backends (``sampler_backends()`` says which work here, and the doctor prints it):

- ``torch``: eager PyTorch on the folded SamplingChain (BatchNorm folded into the convs,
  aegan_fast.export.fold); ``fold=False`` runs the chain of the nets as trained instead, through
  aegan_fast.ops;
- ``compile``: ``torch.compile`` of the folded chain (inductor default options, never
  ``freezing=True``, which gave wrong outputs on this family). Each new batch size is checked
  against eager on its first call; a mismatch raises instead of returning wrong images;
- ``onnxruntime``: an exported ONNX file, or a checkpoint exported on the fly; CPU provider, or
  the CUDA provider when onnxruntime has it and the device is a GPU;
- ``tensorrt``: a serialized engine (``python -m aegan_fast.export --format tensorrt``), run with
  ``execute_async_v3`` on torch CUDA buffers on the current stream, optionally from a CUDA graph.

Any batch size works: the sampler splits z into chunks of the backend's largest batch (an
engine's profile max, a fixed-batch ONNX's batch) and pads a short last chunk where the backend
needs a fixed or minimum batch. Images come back as float32 in [-1, 1] on z's device.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from .checkpoint import load_sampling_nets
from .device import pick_device
from .errors import UserError
from .models import SamplingChain, run_in_chunks, seeded_z

BACKENDS = ("torch", "compile", "onnxruntime", "tensorrt")
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
    from .export.trt import tensorrt_unavailable
    out["tensorrt"] = tensorrt_unavailable()
    return out


def path_kind(path: Path) -> str:
    """'onnx', 'plan' (a TensorRT engine) or 'checkpoint' (a run directory or checkpoint file)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".plan", ".engine", ".trt"):
        return "plan"
    return "checkpoint"


class Sampler:
    """z (N × z_dim) → images (N × 3 × R × R, float32 in [-1, 1]) with one of BACKENDS.

    Build it with ``Sampler.load``; ``sampler(z)`` for given noise, ``sampler.sample(n, seed)`` for
    the seeded noise the sample CLI draws."""

    def __init__(self, run, *, backend: str, z_dim: int, resolution: int, device: torch.device,
                 max_batch: int | None = None, min_batch: int = 1, denoise: bool = True, description: str = "",
                 chain: SamplingChain | None = None):
        self._run = run
        self.chain = chain  # the SamplingChain the torch/compile backends run; None for the others
        self.backend, self.z_dim, self.resolution = backend, z_dim, resolution
        self.device, self.max_batch, self.min_batch = torch.device(device), max_batch, min_batch
        self.denoise, self.description = denoise, description

    def __repr__(self) -> str:
        return (f"Sampler(backend={self.backend!r}, R={self.resolution}, z_dim={self.z_dim}, device={self.device}, "
                f"max_batch={self.max_batch}, {self.description})")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, backend: str | None = None, device: str | torch.device = "auto", *,
             use_ema: bool = True, denoise: bool = True, fold: bool = True, dtype: torch.dtype = torch.float32,
             channels_last: bool = False, compile_mode: str | None = None, onnx_dtype: str = "fp32",
             cuda_graph: bool = False) -> "Sampler":
        """A sampler for ``path``: a run directory or checkpoint (backends torch, compile, onnxruntime —
        exported on the fly), an ``.onnx`` file (onnxruntime) or a TensorRT ``.plan`` (tensorrt).
        ``backend=None`` picks from the path (onnx → onnxruntime, plan → tensorrt, else torch).

        torch/compile only: ``fold`` (BatchNorm folded, default), ``dtype`` (compute dtype), ``channels_last``,
        ``compile_mode`` (a torch.compile mode). onnxruntime from a checkpoint: ``onnx_dtype`` fp32|fp16.
        tensorrt: ``cuda_graph``."""
        path = Path(path).expanduser()
        kind = path_kind(path)
        backend = backend or {"onnx": "onnxruntime", "plan": "tensorrt"}.get(kind, "torch")
        if backend not in BACKENDS:
            raise UserError(f"unknown sampler backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if kind != "checkpoint" and not path.is_file():
            raise UserError(f"no file at {path}")
        dev = pick_device(str(device))
        reason = sampler_backends(dev).get(backend)
        if reason:
            raise UserError(f"sampler backend {backend!r} is not available on {dev}: {reason}")

        if backend in ("torch", "compile"):
            if kind != "checkpoint":
                raise UserError(f"backend {backend!r} runs a run directory or checkpoint, not a .{path.suffix[1:]} file")
            return cls._load_torch(path, backend, dev, use_ema, denoise, fold, dtype, channels_last, compile_mode)
        if backend == "onnxruntime":
            if kind == "plan":
                raise UserError("a TensorRT engine runs with backend 'tensorrt', not 'onnxruntime'")
            return cls._load_onnxruntime(path, kind, dev, use_ema, denoise, onnx_dtype)
        if kind != "plan":
            raise UserError(f"backend 'tensorrt' needs an engine built with `python -m aegan_fast.export --ckpt "
                            f"{path} --format tensorrt --out sampler.plan`, not {path.name}")
        return cls._load_tensorrt(path, dev, denoise, cuda_graph)

    @classmethod
    def _load_torch(cls, path, backend, device, use_ema, denoise, fold, dtype, channels_last, compile_mode):
        from .export.fold import fold_chain

        cfg, nets = load_sampling_nets(path, device, use_ema=use_ema)
        chain = SamplingChain.of(nets, denoise)
        chain = (fold_chain(chain) if fold else chain.eval().requires_grad_(False)).to(device=device, dtype=dtype)
        if channels_last:
            chain = chain.to(memory_format=torch.channels_last)
        desc = f"{'folded' if fold else 'unfolded'}, {str(dtype).removeprefix('torch.')}" + \
               (", channels_last" if channels_last else "")

        def eager(z):
            with torch.inference_mode():
                return chain(z.to(dtype))

        run = eager
        if backend == "compile":
            run = _ParityCheckedCompile(chain, dtype, compile_mode)
            desc += f", torch.compile(mode={compile_mode})"
        return cls(run, backend=backend, z_dim=cfg.model.z_dim, resolution=cfg.model.resolution, device=device,
                   denoise=denoise, description=desc, chain=chain)

    @classmethod
    def _load_onnxruntime(cls, path, kind, device, use_ema, denoise, onnx_dtype):
        import numpy as np

        from .export.onnx_export import INPUT_NAME, OUTPUT_NAME, onnx_metadata

        if kind == "checkpoint":
            from .export.onnx_export import export_checkpoint
            tmp = Path(tempfile.mkdtemp(prefix="aegan-onnx-"))
            onnx_path = tmp / "sampler.onnx"
            try:
                export_checkpoint(path, onnx_path, dtype=onnx_dtype, use_ema=use_ema, denoise=denoise)
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
        fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None

        def run(z):
            x = z.detach().to("cpu", torch.float32).numpy().astype(in_dtype)
            y = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            return torch.from_numpy(y.astype(np.float32, copy=False))

        providers = session.get_providers()
        return cls(run, backend="onnxruntime", z_dim=z_dim, resolution=resolution, device=device,
                   max_batch=fixed, min_batch=fixed or 1, denoise=denoise,
                   description=f"{np.dtype(in_dtype).name}, providers={providers}")

    @staticmethod
    def _ort_session(onnx_path, device):
        from .export.onnx_export import ort_session
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else None
        return ort_session(onnx_path, providers)

    @classmethod
    def _load_tensorrt(cls, path, device, denoise, cuda_graph):
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
                   max_batch=runner.max_batch, min_batch=runner.min_batch, denoise=denoise,
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

    def sample(self, n: int, seed: int = 0, batch: int = 64, progress: bool = False) -> torch.Tensor:
        """n images (on the CPU) from the z every sampler draws for ``seed`` (``models.seeded_z``), the
        same images SamplingChain.sample gives for the chain this sampler runs."""
        return run_in_chunks(self, seeded_z(n, self.z_dim, seed), batch, progress)


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
