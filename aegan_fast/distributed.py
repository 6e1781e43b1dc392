"""Training on several processes: ``torchrun --nproc_per_node=N [--nnodes ...] -m aegan_fast.train``.

torchrun starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
address; ``init`` joins the process group (NCCL on GPUs, gloo on CPUs) with the run's collective
timeout, so a rank that hangs fails the others after that long instead of blocking them for ever.

How gradients are averaged, and why not DDP: an AEGAN step trains up to five nets with their own
optimizers, runs a discriminator twice (real and fake) before one backward, and toggles
``requires_grad`` between the discriminator's and the generator's phase. DDP's reducer is built
for one forward and one backward per module and step; with ``broadcast_buffers=True`` its buffer
broadcast at the second forward also rewrites BatchNorm buffers in place under autograd. So each
optimizer phase averages the gradients of exactly the nets it steps (``GradientReducer``, driven
by the guard around every backward): bucketed, and each bucket's all-reduce launched while the
backward still computes the rest, as DDP overlaps them. That keeps step functions plain
single-device code and gives identical averaged gradients (hence bit-identical weights) on every
rank, which ``check_consistency`` verifies before every checkpoint.

BatchNorm: without ``--sync-bn`` each rank normalises with its own batch's statistics (as DDP does)
and the running statistics drift apart per rank; they are averaged across ranks before each
checkpoint (``average_buffers``, timm's "reduce" mode), so what is saved, and what frozen nets use
in later stages, is the same on every rank. With ``--sync-bn`` the fused ops reduce their
statistics across ranks (ops/sync_bn.py) and the buffers never differ.

Rank-0-only work (evaluations, grids, the sampling pointer, the loss plot) runs through
``main_only``: rank 0 runs it and publishes its outcome in the process group's store, and the other
ranks poll for that key instead of entering a collective. A rank-0 failure then stops every rank
with rank 0's own message, and an evaluation longer than the collective timeout does not fail the
waiting ranks: their wait has its own deadline, ``AEGAN_RANK0_WAIT_S`` seconds (default 6 hours),
which only a rank 0 that hangs or dies outside torchrun (which would stop the job) ever reaches.

When things go wrong between machines, each rank says so in one line (a ``PeerLost`` or
``UserError``; the CLI exits 2), never with a collective's traceback: a process or node that stops
fails the others' next collective (at once when its connections close, else after the collective
timeout: ``lost_contact``); processes that never all join the job fail after ``join_timeout_s``;
and a run directory that is not one folder seen by every node is refused before anything is
written (``check_shared_folder``).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import secrets
import socket
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")
RANK0_WAIT_S = 6 * 3600.0  # a rank-0 evaluation at R=512 with many samples can take an hour or more
# torchrun starts every worker of a job within seconds of the others; what may still delay one is
# importing torch and reading a checkpoint's config on a busy node. Longer than this: it is not coming.
JOIN_TIMEOUT_S = 600.0
# How long the other ranks look for rank 0's token file in the run directory: a network filesystem
# may take a moment to show a new file on another node (its directory attributes are cached).
SHARED_FOLDER_WAIT_S = 5.0


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs, draws grids, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def job_id() -> str:
    """What names this torchrun job across its elastic restarts: the rendezvous id (``--rdzv-id``;
    ``--standalone`` makes one), else the agent's process id (the agent outlives its workers)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return run_id if run_id and run_id != "none" else f"agent{os.getppid()}"


def current() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return SINGLE


def join_timeout_s(collective_timeout_s: float) -> float:
    """How long a process waits for the others of its job to join: the collective timeout, at
    most JOIN_TIMEOUT_S."""
    return min(collective_timeout_s, JOIN_TIMEOUT_S)


def init(device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """Join torchrun's process group when launched by it with more than one process; (world,
    this rank's device: ``cuda:LOCAL_RANK`` for a CUDA run). Every process of the job must arrive
    within ``join_timeout_s(timeout_s)``, else a UserError on those that did."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or not launched_by_torchrun():
        return SINGLE, device
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; run without torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPUs: "
                            f"--nproc_per_node must not exceed the GPU count")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        # torchrun's store outlives a restart of the workers, and the previous attempt's gloo
        # addresses are still in it (restarted ranks then dial dead peers): one key prefix per attempt.
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"aegan_fast/attempt{restart_count()}", store)
        _wait_for_everyone(store, rank, world_size, join_timeout_s(timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return current(), device


def _wait_for_everyone(store, rank: int, size: int, timeout_s: float) -> None:
    """Every process of the job counted in the store before gloo/NCCL connect (which would wait the
    whole collective timeout, then fail with a traceback); polling, so the wait is ours to bound."""
    try:
        store.add("joined", 1)
        start, pause = time.monotonic(), 0.01
        while (joined := store.add("joined", 0)) < size:
            if time.monotonic() - start > timeout_s:
                raise UserError(
                    f"rank {rank}: only {joined} of the job's {size} processes started within {timeout_s:g} s: a node "
                    f"never started its torchrun, or its processes failed before joining (that node's output says "
                    f"why); start every node with the same command (torchrun's own wait for nodes: --rdzv-conf "
                    f"join_timeout=S)")
            time.sleep(pause)
            pause = min(pause * 2, 0.25)
    except RuntimeError as e:
        raise lost_contact(e, "the start of the job") from None


class PeerLost(UserError):
    """Another process of the job, or its node, stopped answering: a collective or the rendezvous
    store failed. Every surviving rank raises it, in one line."""


_SOURCE = re.compile(r"^\[[^\]]*\]\s*")  # gloo's "[.../pair.cc:553] " before its message


def lost_contact(e: BaseException, during: str) -> PeerLost | None:
    """A PeerLost naming what happened when e is a failed collective or store operation (torch's
    DistError, or the RuntimeError gloo and NCCL raise), else None."""
    if isinstance(e, MainRankFailed):  # rank 0's own error, already in one line
        return None
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not isinstance(e, dist.DistError) and not re.search(
            r"gloo|nccl|connection (closed|reset)|timed out|tcpstore|socket|broken pipe", text, re.IGNORECASE):
        return None
    cause = _SOURCE.sub("", text).split(". This is typically")[0][:200]
    return PeerLost(f"rank {current().rank if dist.is_initialized() else os.environ.get('RANK', '?')} lost contact "
                    f"with the other processes during {during} ({cause}): another process or its node stopped "
                    f"(its own output says why), or did not answer within --collective-timeout-s")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device(world_device: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    return world_device if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool, device: torch.device = torch.device("cpu")) -> bool:
    """True on every rank when ``flag`` is true on any (one tiny all-reduce)."""
    if not current().distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class GradientReducer:
    """Averages the gradients of one backward over the ranks, bucket by bucket while the backward
    is still running (DDP's overlap, without its one-forward-one-backward reducer).

    ``begin(params)`` before the backward cuts the params (in reverse, the order their gradients
    arrive) into buckets of about ``bucket_bytes``; a hook on each parameter's gradient
    accumulation launches a bucket's all-reduce, asynchronously, as soon as all its gradients are
    in, and buckets always start in index order so every rank issues the same collectives in the
    same order. ``finish(extra)`` after the backward sends what is left (with ``extra``, the
    guard's non-finite flag, in the last bucket), waits, and writes the means back.

    Each element is summed over the ranks and divided by their number exactly as one flattened
    all-reduce does it, so on two ranks (where a sum has one order) the weights are bit for bit the
    unbucketed ones; with more ranks gloo's ring may associate a sum differently per bucket layout,
    still identically on every rank. ``bucket_bytes=0``: one all-reduce after the backward, no overlap.
    """

    def __init__(self, bucket_bytes: float):
        self.bucket_bytes = bucket_bytes
        self.comm_s = 0.0            # seconds blocked waiting for collectives (the exposed communication)
        self._hooked: dict[int, weakref.ref] = {}
        self._bucket_of: dict[int, int] = {}
        self._buckets: list[list[torch.Tensor]] = []
        self._missing: list[int] = []
        self._work: list = []        # per launched bucket: (collective handle, flat tensor, its grads)

    def begin(self, params: list[torch.Tensor]) -> None:
        params = [p for p in params if p.requires_grad]
        self._buckets, size = [], 0.0
        if self.bucket_bytes > 0:
            for p in reversed(params):
                if not self._buckets or size >= self.bucket_bytes:
                    self._buckets.append([])
                    size = 0.0
                self._buckets[-1].append(p)
                size += p.numel() * 4
        elif params:
            self._buckets = [list(reversed(params))]
        self._bucket_of = {id(p): i for i, bucket in enumerate(self._buckets) for p in bucket}
        self._missing = [len(b) for b in self._buckets]
        self._work = []
        if self.bucket_bytes > 0:
            for p in params:
                known = self._hooked.get(id(p))
                if known is None or known() is not p:
                    p.register_post_accumulate_grad_hook(self._arrived)
                    self._hooked[id(p)] = weakref.ref(p)

    def _arrived(self, p: torch.Tensor) -> None:
        i = self._bucket_of.get(id(p))
        if i is None:
            return  # a backward outside begin/finish (a test's, an evaluation's)
        self._missing[i] -= 1
        while len(self._work) < len(self._buckets) - 1 and self._missing[len(self._work)] == 0:
            self._launch(len(self._work))  # the last bucket waits for finish: it carries the flag

    def _launch(self, i: int, extra: torch.Tensor | None = None) -> None:
        grads = [p.grad for p in self._buckets[i] if p.grad is not None]
        parts = [g.reshape(-1).float() for g in grads] + ([extra.reshape(-1).float()] if extra is not None else [])
        if not parts:  # nothing arrived in this bucket (its nets sat out this backward): no collective
            self._work.append((None, None, None, []))
            return
        flat = torch.cat(parts)
        target = flat.to(_collective_device(flat.device))
        self._work.append((dist.all_reduce(target, async_op=True), target, flat, grads))

    def finish(self, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Wait for every bucket and write back the means; ``extra`` comes back summed over the ranks."""
        if not self._buckets:
            if extra is None:
                return None
            self._buckets, self._missing = [[]], [0]
        while len(self._work) < len(self._buckets):
            i = len(self._work)
            self._launch(i, extra if i == len(self._buckets) - 1 else None)
        t0 = time.perf_counter()
        size, summed = current().size, None
        for work, target, flat, grads in self._work:
            if work is None:
                continue
            work.wait()
            flat = target.to(flat.device)
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset:offset + n].view_as(g).div_(size))
                offset += n
            summed = flat[offset:]
        self.comm_s += time.perf_counter() - t0
        self._buckets, self._bucket_of, self._work = [], {}, []
        return summed.view_as(extra) if extra is not None else None


def broadcast_from_main(tensors) -> None:
    """Every rank takes rank 0's values (at the start of a run: one set of initial weights)."""
    for t in tensors:
        dist.broadcast(t.data if isinstance(t, torch.nn.Parameter) else t, src=0)


def _float_buffers(module: torch.nn.Module):
    return [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]


def average_buffers(modules: dict) -> None:
    """BatchNorm running statistics averaged over the ranks (see the module docstring)."""
    for module in modules.values():
        for _, b in _float_buffers(module):
            t = b.to(_collective_device(b.device))
            dist.all_reduce(t)
            b.copy_(t.div_(current().size))


def check_consistency(named: dict) -> None:
    """Every rank holds rank 0's exact tensors; else a UserError on every rank naming the first that
    differs. ``named``: {name: module}; parameters and buffers are compared bit for bit."""
    tensors = [(f"{k}.{n}", t) for k, m in named.items()
               for n, t in list(m.named_parameters()) + list(m.named_buffers())]
    first = len(tensors)
    for i, (_, t) in enumerate(tensors):
        mine = t.detach().to(_collective_device(t.device))
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        if first == len(tensors) and not torch.equal(mine, theirs):
            first = i
    worst = torch.tensor([first], dtype=torch.int64, device=_collective_device(tensors[0][1].device) if tensors
                         else torch.device("cpu"))
    dist.all_reduce(worst, op=dist.ReduceOp.MIN)
    if int(worst) < len(tensors):
        raise UserError(f"ranks disagree before a checkpoint: {tensors[int(worst)][0]} differs from rank 0's "
                        f"(a nondeterministic op, or a rank that skipped a step); nothing was saved")


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """values averaged over the ranks (one all-reduce); as given on one process."""
    if not current().distributed:
        return values
    t = values.detach().float().to(_collective_device(values.device))
    dist.all_reduce(t)
    return t.div_(current().size).to(values.device)


def check_shared_folder(folder: Path) -> None:
    """Every rank sees the folder rank 0 writes in (the run directory must be one folder on a
    filesystem every node mounts, at the same path), else a UserError on every rank before
    anything is written there. Rank 0 writes a file with a random token, every other rank must
    read that token back from its own view of the folder; rank 0 removes the file again."""
    world = current()
    if not world.distributed:
        return
    token, name, error = None, None, None
    if world.main:  # the name too is rank 0's: every rank looks for the same file
        token = secrets.token_hex(16)
        name = f".aegan-shared-check-{token[:8]}"
        try:
            (folder / name).write_text(token)
        except OSError as e:
            error = f"rank 0 cannot write in {folder}: {e.strerror or e}"
    token, name, error = broadcast_object((token, name, error))
    if error:
        raise UserError(error)
    token_file = folder / name
    seen = token if world.main else _read_token(token_file)
    views = gather_objects((seen == token, socket.gethostname()))
    if world.main:
        token_file.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise UserError(f"the run directory {folder} is not the same folder on every node: {', '.join(blind)} "
                        f"cannot see the file rank 0 ({views[0][1]}) wrote there; put it on a filesystem every node "
                        f"mounts at the same path (NFS, Lustre, ...) and give every node the same absolute path")


def _read_token(path: Path) -> str | None:
    deadline = time.monotonic() + SHARED_FOLDER_WAIT_S
    while True:
        try:
            return path.read_text()
        except OSError:
            if not path.parent.is_dir() or time.monotonic() > deadline:
                return None
        try:
            os.listdir(path.parent)  # asks a network filesystem for the folder again, past its cached listing
        except OSError:
            return None
        time.sleep(0.2)


def gather_objects(obj) -> list:
    """[each rank's obj] on every rank (small objects: RNG states)."""
    out = [None] * current().size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's obj on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if current().distributed:
        dist.barrier()


class MainRankFailed(RuntimeError):
    """Rank 0's rank-0-only work failed with an error other than a UserError (its traceback is in
    rank 0's output); the other ranks stop with this, naming it."""


def _rank0_wait_s() -> float:
    text = os.environ.get("AEGAN_RANK0_WAIT_S", "")
    try:
        value = float(text) if text else RANK0_WAIT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"AEGAN_RANK0_WAIT_S must be a number of seconds > 0, got {text!r}")
    return value


def main_only(fn: Callable[[], T], what: str, world: World | None = None, wait_s: float | None = None) -> T | None:
    """``fn()`` on rank 0 alone, its result there (None on the other ranks), with every rank leaving
    together and with rank 0's error: the others wait for rank 0's outcome in the store (polling,
    no collective, so no collective timeout), then raise ``UserError("rank 0: ...")`` for a
    UserError and MainRankFailed for anything else. Every rank must make the same sequence of
    calls (the n-th call of each rank meets the n-th of rank 0), whatever rank 0's fn does inside.
    ``what`` names the work in errors; ``wait_s`` bounds the wait (default ``AEGAN_RANK0_WAIT_S``).
    One process: a plain call."""
    world = world or current()
    if not world.distributed:
        return fn()
    store = dist.distributed_c10d._get_default_store()
    # Each rank counts its own calls in the store, so the count lives and dies with the process group
    # (an elastic restart's fresh group starts again at 1) and needs no module state.
    key = f"aegan_fast/main_only/{store.add(f'aegan_fast/main_only/calls/rank{world.rank}', 1)}"
    if world.main:
        outcome = {"kind": "ok"}
        try:
            return fn()
        except UserError as e:
            outcome = {"kind": "user", "message": str(e)}
            raise
        except BaseException as e:  # Ctrl-C and bugs too: the others must not wait for a result that never comes
            outcome = {"kind": "error", "type": type(e).__name__, "message": str(e)}
            raise
        finally:
            store.set(key, json.dumps(outcome))
    deadline_s = wait_s if wait_s is not None else _rank0_wait_s()
    start = time.monotonic()
    pause = 0.005
    while not store.check([key]):
        waited = time.monotonic() - start
        if waited > deadline_s:
            raise UserError(f"rank {world.rank} waited {waited:.0f} s for rank 0 to finish {what} (at most "
                            f"AEGAN_RANK0_WAIT_S={deadline_s:g} s): rank 0 hangs or has died")
        time.sleep(pause)  # a Python-level sleep: this rank's SIGTERM handler still runs
        pause = min(pause * 2, 0.25)
    outcome = json.loads(store.get(key))
    if outcome["kind"] == "user":
        raise UserError(f"rank 0: {outcome['message']}")
    if outcome["kind"] == "error":
        raise MainRankFailed(f"rank 0 failed in {what}: {outcome['type']}: {outcome['message']} "
                             f"(its traceback is in rank 0's output)")
    return None
