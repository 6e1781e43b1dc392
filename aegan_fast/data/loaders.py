"""The trainer's batch loaders: ``--loader auto|torch|dali``.

Both yield ``(x, idx, mirror)``: x float32 N×3×R×R in [-1, 1] (x/127.5 − 1) on the training device,
contiguous NCHW; idx the images' indices in the ImageSet they read (int64, CPU), which for the trainer
is the training split, so held-out images are never read; mirror which of them are horizontally
flipped (bool, CPU).

``torch`` (TorchLoader): gathers from the uint8 array (in RAM, or memory-mapped for sets larger than
``data_cache_mb``) in background threads, ``workers`` batches ahead; pinned host memory and a
non-blocking copy on a GPU, where the uint8→float normalisation runs after the copy (4× fewer bytes
over PCIe). Threads, not processes: torch's gather releases the GIL, and there is nothing to pickle.
Its order is a pure function of (seed, images consumed): epoch e is a permutation of the set drawn
from a generator seeded with (seed, e), with a mirror bit per image, and when torch.distributed is
initialised, rank r of W takes every W-th slice of B images of that stream. So a resumed run
(which knows how many images it consumed) gets exactly the batches of a run that never stopped.

``dali`` (DaliLoader, nvidia-dali-cuda130): ``fn.readers.file`` over the encoded files of the
ImageSet's rows only (a split's slice of the prepared set's files; shard_id/num_shards by rank, a fresh shuffle each epoch), ``fn.decoders.image`` on device "mixed"
(nvJPEG on the GPU, JPEG files; other formats decode on the CPU) or "cpu", a coin-flip mirror and
``crop_mirror_normalize`` to the same [-1, 1] CHW float32, through ``DALIGenericIterator`` with
auto_reset. Resuming: the pipeline runs with DALI's checkpointing on; ``state_dict()`` holds the
iterator's checkpoint (reader position, shuffle and coin-flip RNG states, accounting for prefetched
batches), which the trainer saves with its own, so a resumed run gets the same batches as an
uninterrupted one (tested on the CPU pipeline; a checkpoint without it restarts the stream).

``auto``: DALI pays for decoding every image every epoch, which on a CPU is far slower than gathering
uint8 images (bench/RESULTS.md): it is chosen only on a GPU, with DALI installed, for a set that does
not fit the RAM cache and has GPU-decodable (JPEG) files. Otherwise torch. The choice is logged.
"""
from __future__ import annotations

import importlib.util
import logging
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..distributed import current as current_world
from ..errors import UserError
from .dataset import ImageSet, to_float

log = logging.getLogger("aegan_fast.data")

LOADERS = ("auto", "torch", "dali")
DALI_PIP = "pip install nvidia-dali-cuda130==2.4.0 -c constraints.txt"


def dali_unavailable() -> str | None:
    """None when DALI imports, else why not."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return f"nvidia-dali-cuda130 is not installed ({DALI_PIP})"
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:
        return f"nvidia.dali does not import: {type(e).__name__}: {e}".splitlines()[0]
    return None


class TorchLoader:
    """Batches from the uint8 image array, prepared ``workers`` batches ahead in threads."""
    name = "torch"

    def __init__(self, data: ImageSet, batch: int, seed: int, device, start: int = 0, flip: bool = True,
                 shuffle: bool = True, workers: int = 2, shard: tuple[int, int] | None = None):
        self.data, self.batch, self.seed, self.flip, self.shuffle = data, batch, seed, flip, shuffle
        self.device = torch.device(device)
        world = current_world()
        self.rank, self.world = shard or (world.rank, world.size)
        self.consumed = start            # images this rank has consumed
        self._planned = start            # images this rank has queued
        self._epochs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pin = self.device.type == "cuda"
        self.depth = max(1, workers)
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="aegan-loader") if workers > 0 else None
        self._queue: deque = deque()
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)

    def _epoch(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Epoch e's order and mirror bits, a pure function of (seed, e)."""
        if e not in self._epochs:
            n = len(self.data)
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, e]).generate_state(1)[0]))
            order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            mirror = torch.rand(n, generator=g) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool)
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (order, mirror)
        return self._epochs[e]

    def plan(self, consumed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (idx, mirror) of this rank's batch after it has consumed ``consumed`` images."""
        n = len(self.data)
        pos = consumed * self.world + self.rank * self.batch + torch.arange(self.batch)
        epochs, within = pos // n, pos % n
        idx = torch.empty(self.batch, dtype=torch.long)
        mirror = torch.empty(self.batch, dtype=torch.bool)
        for e in epochs.unique().tolist():
            sel = epochs == e
            order, flips = self._epoch(e)
            idx[sel] = order[within[sel]]
            mirror[sel] = flips[within[sel]]
        return idx, mirror

    def _load(self, idx: torch.Tensor, mirror: torch.Tensor):
        x = self.data.images.index_select(0, idx)
        if mirror.any():
            x[mirror] = x[mirror].flip(-1)
        if self.pin:
            return x.pin_memory(), idx, mirror
        return to_float(x), idx, mirror  # on the CPU the normalisation is done ahead too

    def _fill(self) -> None:
        while len(self._queue) < self.depth:
            idx, mirror = self.plan(self._planned)
            self._planned += self.batch
            self._queue.append(self._pool.submit(self._load, idx, mirror))

    def __iter__(self):
        return self

    def __next__(self):
        if self._pool is None:
            x, idx, mirror = self._load(*self.plan(self.consumed))
        else:
            self._fill()
            x, idx, mirror = self._queue.popleft().result()
            self._fill()
        self.consumed += self.batch
        if self.pin:
            x = to_float(x.to(self.device, non_blocking=True))
        return x, idx, mirror

    def state_dict(self) -> dict:
        return {"kind": "torch", "consumed": self.consumed}  # the order itself is a function of (seed, consumed)

    def close(self) -> None:
        self._queue.clear()
        self._finalizer()


def _shutdown(pool):
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


class DaliLoader:
    """A DALI pipeline over the prepared set's encoded files (see the module docstring)."""
    name = "dali"

    def __init__(self, data: ImageSet, batch: int, seed: int, device, start: int = 0, flip: bool = True,
                 shuffle: bool = True, workers: int = 2, shard: tuple[int, int] | None = None,
                 encoded: str | None = None, prefetch: int = 2, state: dict | None = None):
        reason = dali_unavailable()
        if reason:
            raise UserError(f"--loader dali: {reason}")
        if data.root is None:
            raise UserError("--loader dali needs a prepared data set on disk (its encoded files), "
                            "not an in-memory one")
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from .prepare import ensure_encoded
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        info = (data.manifest or {}).get("encoded") or {}
        files = ensure_encoded(data.root, encoded or info.get("format") or ("jpeg" if gpu else "png"),
                               progress=False)[data.start:data.stop]  # file i is row i: the split's own files
        world = current_world()
        self.rank, self.world = shard or (world.rank, world.size)
        self.batch = batch
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu else None
        pipe = _dali_pipeline(batch_size=batch, num_threads=max(1, workers), device_id=device_id,
                              seed=seed * 1009 + self.rank, prefetch_queue_depth=prefetch,
                              files=[str(f) for f in files], shard_id=self.rank, num_shards=self.world,
                              decode="mixed" if gpu else "cpu", flip=flip, shuffle=shuffle,
                              checkpoint=_dali_checkpoint(state))
        pipe.build()
        self._iter = DALIGenericIterator([pipe], ["x", "idx", "mirror"], reader_name="Reader", auto_reset=True,
                                         last_batch_policy=LastBatchPolicy.DROP)
        self.consumed = start
        if start and _dali_checkpoint(state) is None:
            log.warning("--loader dali: no DALI checkpoint to resume from; the reader restarts its stream (same "
                        "seed): batches statistically equivalent, not identical, to an uninterrupted run's")

    def __iter__(self):
        return self

    def __next__(self):
        try:
            out = next(self._iter)
        except StopIteration:  # end of an epoch; auto_reset has rewound the reader
            out = next(self._iter)
        out = out[0]
        self.consumed += self.batch
        x = out["x"]
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        return x, out["idx"].view(-1).long().cpu(), out["mirror"].view(-1).bool().cpu()

    def state_dict(self) -> dict:
        """The iterator's DALI checkpoint as a uint8 tensor (checkpoints load with weights_only=True)."""
        cp = self._iter.checkpoints()[0]
        cp = cp.encode() if isinstance(cp, str) else bytes(cp)
        return {"kind": "dali", "consumed": self.consumed,
                "checkpoint": torch.frombuffer(bytearray(cp), dtype=torch.uint8).clone()}

    def close(self) -> None:
        self._iter = None


def _dali_checkpoint(state: dict | None):
    if not state or state.get("kind") != "dali" or state.get("checkpoint") is None:
        return None
    return bytes(state["checkpoint"].numpy().tobytes())


def _dali_pipeline(*, batch_size, num_threads, device_id, seed, prefetch_queue_depth, files, shard_id,
                   num_shards, decode, flip, shuffle, checkpoint=None):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=prefetch_queue_depth, enable_checkpointing=True)
    def pipeline():
        encoded, labels = fn.readers.file(files=files, labels=list(range(len(files))), shard_id=shard_id,
                                          num_shards=num_shards, shuffle_after_epoch=shuffle,
                                          pad_last_batch=False, name="Reader")
        images = fn.decoders.image(encoded, device=decode, output_type=types.RGB)
        mirror = fn.random.coin_flip(probability=0.5) if flip else fn.random.coin_flip(probability=0.0)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)
        return images, labels, mirror

    return pipeline(checkpoint=checkpoint) if checkpoint is not None else pipeline()


def loader_threads(kind: str, device: torch.device) -> tuple[int, str]:
    """``--loader-workers`` left unset: (threads, why). The torch loader on a CPU device loads in the
    training thread: a loader thread's torch ops start an OpenMP team of their own, whose threads
    contend with the step's for the same cores (measured on 2 cores: 2 threads cost stage 1 12-24% of
    its img/s, while loading in line waits about 1% of the time; bench/RESULTS.md, "Where the demo's
    minutes go"). On a GPU, and for DALI's CPU stages, 2 threads."""
    if kind == "torch" and device.type == "cpu":
        return 0, "a CPU device: in the training thread, whose cores the step uses"
    return 2, "2 threads ahead"


def make_loader(kind: str, data: ImageSet, batch: int, seed: int, device, start: int = 0,
                workers: int | None = None, flip: bool = True, shuffle: bool = True, state: dict | None = None):
    """The loader named by ``--loader`` (auto resolved as in the module docstring), with ``workers``
    threads (None: ``loader_threads``); logs the choices."""
    device = torch.device(device)
    if kind not in LOADERS:
        raise UserError(f"--loader must be one of {', '.join(LOADERS)}")
    if kind == "auto":
        kind, why = choose_loader(data, device)
        log.info("loader: %s (auto: %s)", kind, why)
    else:
        log.info("loader: %s", kind)
    if workers is None:
        workers, why = loader_threads(kind, device)
        log.info("loader threads: %d (%s)", workers, why)
    if kind == "dali":
        return DaliLoader(data, batch, seed, device, start=start, flip=flip, shuffle=shuffle, workers=workers,
                          state=state)
    return TorchLoader(data, batch, seed, device, start=start, flip=flip, shuffle=shuffle, workers=workers)


def choose_loader(data: ImageSet, device: torch.device) -> tuple[str, str]:
    if device.type != "cuda":
        return "torch", "on a CPU, gathering uint8 images beats decoding them (DALI's CPU path decodes)"
    reason = dali_unavailable()
    if reason:
        return "torch", reason
    if data.in_ram:
        return "torch", "the set fits the RAM cache: no decoding needed"
    info = (data.manifest or {}).get("encoded") or {}
    if data.root is None or info.get("format") != "jpeg":
        return "torch", "no JPEG files prepared for GPU decoding (prepare with --encoded jpeg)"
    return "dali", "set larger than the RAM cache, JPEG files decoded on the GPU"
