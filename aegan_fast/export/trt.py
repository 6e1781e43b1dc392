"""TensorRT: build an engine from the exported ONNX, describe it in a JSON sidecar, run it.

Written to the documented TensorRT Python API (10.x and 11.x); TensorRT cannot be installed on the
machines this project is developed and tested on, so the build and the runtime here are unverified
there and their tests skip with a reason. What runs without TensorRT (the ONNX it consumes, the
sidecar, argument checks) is tested.

Build: a strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on 10.x; 11.x is
always strongly typed and ignores or lacks the flag, so it is feature-detected), parsed from the
fp16 ONNX, one optimisation profile over the batch (min/opt/max), a workspace limit, and a timing
cache file that is read before and written back after the build. Runtime: ``execute_async_v3`` on
torch-allocated CUDA buffers on the current torch stream, optionally replayed from a CUDA graph.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

from ..files import atomic_write_bytes, sha256_file

SIDECAR_FORMAT = "aegan_fast-tensorrt-engine/1"


def tensorrt_unavailable() -> str | None:
    """None when an engine can be built and run here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing to load its libraries
        return f"TensorRT is not installed or does not load ({type(e).__name__}: {e})".splitlines()[0]
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and torch sees none (CPU-only torch build, or no GPU)"
    return None


def _trt():
    reason = tensorrt_unavailable()
    if reason:
        raise RuntimeError(reason)
    import tensorrt as trt
    return trt


def sidecar_path(plan_path: str | Path) -> Path:
    """sampler.plan → sampler.json, beside the engine."""
    return Path(plan_path).with_suffix(".json")


def check_profile(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"the batch profile needs 1 ≤ min ≤ opt ≤ max, got min={min_batch} opt={opt_batch} "
                         f"max={max_batch}")


def make_sidecar(*, engine: str | Path, io: dict, profile: dict, tensorrt_version: str, checkpoint: str | Path,
                 checkpoint_sha256: str, onnx_path: str | Path, z_dim: int, resolution: int, denoise: bool,
                 dtype: str, workspace_bytes: int, device: str | None = None) -> dict:
    """The sidecar's content. ``io`` is {'inputs': [...], 'outputs': [...]} of {'name', 'shape', 'dtype'}
    (shapes with -1 or a name for the dynamic batch); ``profile`` {'min', 'opt', 'max'} batch sizes."""
    check_profile(profile["min"], profile["opt"], profile["max"])
    for side in ("inputs", "outputs"):
        if not io.get(side) or any({"name", "shape", "dtype"} - set(t) for t in io[side]):
            raise ValueError(f"io[{side!r}] must list tensors with name, shape and dtype")
    return {
        "format": SIDECAR_FORMAT,
        "engine": Path(engine).name,
        "tensorrt_version": tensorrt_version,
        "inputs": io["inputs"], "outputs": io["outputs"],
        "profile": {k: int(profile[k]) for k in ("min", "opt", "max")},
        "dtype": dtype, "workspace_bytes": int(workspace_bytes),
        "z_dim": int(z_dim), "resolution": int(resolution), "denoise": bool(denoise),
        "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_sha256,
        "onnx": Path(onnx_path).name, "onnx_sha256": sha256_file(onnx_path),
        "device": device,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_sidecar(plan_path: str | Path, info: dict) -> Path:
    path = sidecar_path(plan_path)
    atomic_write_bytes(path, lambda f: f.write((json.dumps(info, indent=2) + "\n").encode()))
    return path


def read_sidecar(plan_path: str | Path) -> dict:
    path = sidecar_path(plan_path)
    if not path.exists():
        raise FileNotFoundError(f"{path} (the JSON sidecar written beside the engine) is missing")
    info = json.loads(path.read_text())
    if info.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path} is not an aegan_fast engine sidecar (format {info.get('format')!r})")
    return info


def _dtype_name(trt, dt) -> str:
    names = {trt.float32: "float32", trt.float16: "float16"}
    if hasattr(trt, "bfloat16"):
        names[trt.bfloat16] = "bfloat16"
    return names.get(dt, str(dt))


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, z_dim: int, min_batch: int, opt_batch: int,
                 max_batch: int, workspace_bytes: int, timing_cache: str | Path | None = None,
                 input_name: str = "z") -> dict:
    """Build a serialized engine from ``onnx_path`` into ``plan_path``; returns {'io', 'tensorrt_version',
    'device'} for the sidecar. Raises RuntimeError with the parser's or builder's errors."""
    check_profile(min_batch, opt_batch, max_batch)
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # 10.x: opt in; 11.x: always strongly typed (flag ignored or gone)
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, z_dim), (opt_batch, z_dim), (max_batch, z_dim))
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else None
    blob = cache_file.read_bytes() if cache_file and cache_file.exists() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU/version is refused

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (its log above says why)")
    atomic_write_bytes(Path(plan_path), lambda f: f.write(memoryview(serialized)))
    if cache_file:
        atomic_write_bytes(cache_file, lambda f: f.write(memoryview(config.get_timing_cache().serialize())))

    def describe(tensors):
        return [{"name": t.name, "shape": [int(d) for d in t.shape], "dtype": _dtype_name(trt, t.dtype)}
                for t in tensors]

    io = {"inputs": describe(network.get_input(i) for i in range(network.num_inputs)),
          "outputs": describe(network.get_output(i) for i in range(network.num_outputs))}
    return {"io": io, "tensorrt_version": trt.__version__, "device": torch.cuda.get_device_name()}


class TensorRTRunner:
    """Runs a serialized engine on torch CUDA tensors: ``runner(z)`` with z (N × z_dim) on the GPU,
    N within the engine's profile, returns the engine's output tensor (its dtype) on the same GPU,
    enqueued on the current torch stream. ``cuda_graph=True`` captures one CUDA graph per batch size
    on first use and replays it afterwards (static input/output buffers, output cloned)."""

    def __init__(self, plan_path: str | Path, cuda_graph: bool = False, device: torch.device | str = "cuda"):
        trt = _trt()
        self.info = read_sidecar(plan_path)
        self.device = torch.device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT {trt.__version__} could not load {plan_path} (built with TensorRT "
                                   f"{self.info.get('tensorrt_version')}? engines are tied to the version and GPU)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        ins = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(ins) != 1 or len(outs) != 1:
            raise RuntimeError(f"expected one input and one output, the engine has {ins} and {outs}")
        self.input_name, self.output_name = ins[0], outs[0]
        to_torch = {trt.float32: torch.float32, trt.float16: torch.float16}
        if hasattr(trt, "bfloat16"):
            to_torch[trt.bfloat16] = torch.bfloat16
        self.input_dtype = to_torch[self.engine.get_tensor_dtype(self.input_name)]
        self.output_dtype = to_torch[self.engine.get_tensor_dtype(self.output_name)]
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.cuda_graph = cuda_graph
        self._graphs: dict[int, tuple] = {}

    def _bind(self, inp: torch.Tensor, out_shape=None) -> torch.Tensor:
        self.context.set_input_shape(self.input_name, tuple(inp.shape))
        shape = tuple(self.context.get_tensor_shape(self.output_name)) if out_shape is None else out_shape
        out = torch.empty(shape, dtype=self.output_dtype, device=inp.device)
        self.context.set_tensor_address(self.input_name, inp.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        return out

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (its log above says why)")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        if not self.min_batch <= n <= self.max_batch:
            raise ValueError(f"batch {n} is outside the engine's profile [{self.min_batch}, {self.max_batch}]")
        inp = z.to(self.device, self.input_dtype).contiguous()
        if not self.cuda_graph:
            out = self._bind(inp)
            self._enqueue()
            return out
        if n not in self._graphs:
            static_in = inp.clone()
            static_out = self._bind(static_in)
            self._enqueue()  # one plain run first: TensorRT finishes shape-dependent setup outside capture
            torch.cuda.current_stream().synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._enqueue()
            self._graphs[n] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[n]
        static_in.copy_(inp)
        graph.replay()
        return static_out.clone()

