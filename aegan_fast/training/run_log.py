"""A run's log: metrics.jsonl (and TensorBoard when installed), preview grids, the evaluation at each
stage's end, and which stage-end checkpoint the run samples from. Rank 0 writes; the other ranks'
calls write nothing (every rank flushes at the same steps: the losses logged are the mean over ranks)."""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import distributed
from ..checkpoint import SAMPLING, resolve_checkpoint, write_sampling_pointer
from ..errors import UserError
from ..evaluation import evaluate_run
from ..models import SamplingChain
from ..viz import save_grid
from .stages import STAGES as STAGE_RECORDS
from .stages import Stage, TrainState

log = logging.getLogger("aegan_fast.training")


class MetricsLog:
    """Averages the step losses between log lines, writes JSONL (and TensorBoard when installed).

    Losses are summed as tensors on their device; the only host sync is ``flush``, which turns the
    sums into numbers and times the whole interval (so img/s is honest on CUDA without a
    synchronize per step). Under torchrun every rank calls ``flush`` at the same steps and the
    interval's losses are averaged over the ranks there, in one small all-reduce per row: a row
    is the whole global batch's loss, not rank 0's share of it. There a row also says what share of
    the interval the ranks spent blocked on gradient all-reduces (``comm_wait``, their mean), from
    ``comm_clock``: the seconds so far (the guard's GradientReducer.comm_s)."""

    def __init__(self, path: Path, device, enabled: bool = True, comm_clock=None):
        self.path, self.device, self.enabled = path, torch.device(device), enabled  # enabled: rank 0
        self.comm_clock = comm_clock
        self.sums: dict = {}
        self.counts: dict = {}  # steps that logged each loss (a term that starts mid-interval: fewer)
        self.count = self.images = self.skipped = 0
        self.data_s = 0.0
        self.restart_clock()  # paused_s: time inside the interval that was not training (grids, checkpoints)
        self.tb = None
        try:
            if not enabled:
                raise ImportError
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            pass

    def add(self, losses: dict, batch: int, data_s: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach()
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1
        self.images += batch
        self.data_s += data_s

    def restart_clock(self) -> None:
        self.started = time.perf_counter()
        self.paused_s = 0.0
        self.comm_at = self.comm_clock() if self.comm_clock else 0.0

    @contextmanager
    def paused(self):
        """Grids and checkpoints between steps are not training time: the interval's img/s leaves
        them out (the interval's images stay counted)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def discard(self) -> None:
        """Forget the interval (after a rollback its steps are trained again)."""
        self.sums.clear()
        self.counts.clear()
        self.count = self.images = self.skipped = 0
        self.data_s = 0.0
        self.restart_clock()

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def flush(self, stage: str, counters: dict, extra: dict | None = None) -> dict | None:
        """The interval's row (``extra``: more keys for it, e.g. augment.log_row's), None when it is empty."""
        if not self.count:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self.started - self.paused_s, 1e-9)
        names = list(self.sums)  # the same names in the same order on every rank: the same step code ran
        values = [self.sums[k].float().reshape(()) for k in names]
        if self.comm_clock is not None:  # rides in the same all-reduce
            values.append(torch.tensor((self.comm_clock() - self.comm_at) / elapsed, device=self.device))
        sums = distributed.mean_over_ranks(torch.stack(values)).tolist() if values else []
        row = {"stage": stage, "kimg": round(counters["total_img"] / 1000, 3),
               "stage_kimg": round(counters["stage_img"] / 1000, 3), "step": counters["step"],
               "losses": {k: v / self.counts[k] for k, v in zip(names, sums)},
               "img_per_s": self.images / elapsed, "data_wait": min(self.data_s / elapsed, 1.0),
               "skipped_updates": self.skipped, "time": time.time(), **(extra or {})}
        if self.comm_clock is not None:
            row["comm_wait"] = min(sums[-1], 1.0)
        if self.skipped:
            log.warning("%s step %d: skipped %d updates with a non-finite loss or gradient", stage, counters["step"],
                        self.skipped)
        self.write(row)
        if self.tb is not None:
            for k, v in row["losses"].items():
                self.tb.add_scalar(f"{stage}/{k}", v, counters["total_img"])
            self.tb.add_scalar("perf/img_per_s", row["img_per_s"], counters["total_img"])
            self.tb.add_scalar("perf/data_wait", row["data_wait"], counters["total_img"])
            if "comm_wait" in row:
                self.tb.add_scalar("perf/comm_wait", row["comm_wait"], counters["total_img"])
        self.sums.clear()
        self.counts.clear()
        self.count = self.images = self.skipped = 0
        self.data_s = 0.0
        self.restart_clock()
        return row


@contextmanager
def eval_mode(nets):
    """Nets in eval mode for a look (grids, evaluation), each restored to its own mode afterwards."""
    was_training = {k: n.training for k, n in nets.items()}
    nets.eval()
    try:
        yield
    finally:
        for k, n in nets.items():
            n.train(was_training[k])


@torch.no_grad()
def save_reconstructions(nets, ema, fixed_z, fixed_real, path: Path) -> None:
    """Real images and their reconstructions F(H(x)) in alternate rows."""
    real = fixed_real[:32]
    rec = nets["F"](nets["H"](real))
    rows = torch.stack([real.view(4, 8, *real.shape[1:]), rec.view(4, 8, *rec.shape[1:])], 1)
    save_grid(rows.reshape(-1, *real.shape[1:]), path, nrow=8)


@torch.no_grad()
def save_chain_samples(nets, ema, fixed_z, fixed_real, path: Path) -> None:
    """The sampling chain on the fixed z, EMA weights when on."""
    save_grid(SamplingChain.of(ema.nets if ema is not None else nets)(fixed_z), path)


PREVIEWS = {"reconstructions": save_reconstructions, "samples": save_chain_samples}


def save_preview(stage: Stage, st: TrainState, fixed_z, fixed_real, path: Path) -> None:
    with eval_mode(st.nets):
        PREVIEWS[stage.preview](st.nets, st.ema, fixed_z, fixed_real, path)


def stage_end_evaluation(stage: Stage, st: TrainState) -> dict:
    """The stage's cheap metrics (reconstruction after ``ae``; ``cfg.eval_metrics`` of the sampling
    chain, EMA weights when on, after the others) on ``cfg.eval_n`` held-out images."""
    metrics = stage.metrics(st.cfg)
    if not metrics:
        return {}
    with eval_mode(st.nets):
        nets = dict(st.nets.items()) | (dict(st.ema.nets.items()) if st.ema is not None else {})
        return evaluate_run(nets, st.data.reference(), metrics, st.cfg.eval_n, st.cfg.seed, st.device)


def metrics_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a kill mid-append is left out."""
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def sampling_choice(stage: Stage, st: TrainState, run_dir: Path, report: dict, metrics: MetricsLog) -> dict | None:
    """After a chain stage other than the run's first, which stage-end checkpoint the run samples from:
    the best SWD of its chain stages so far (ties to the later stage; without SWD figures the latest),
    warning when this stage made SWD worse than the previous chain stage. The metrics.jsonl row that
    records it ({"stage", "kept", "checkpoint", "why", "swd"}), None with one chain stage so far.
    The earlier figures come from metrics.jsonl's eval rows, so a resumed run compares with stages it
    ran before the resume. Training goes on with the latest nets either way: this only picks what is sampled."""
    names = st.cfg.stages[:st.cfg.stages.index(stage.name) + 1]
    chain = [n for n in names if STAGE_RECORDS[n].preview == "samples"]
    if len(chain) < 2:
        return None  # nothing to compare: sampling keeps following latest
    evals = {r["stage"]: r["eval"] for r in metrics_rows(metrics.path) if isinstance(r.get("eval"), dict)}
    evals[stage.name] = report  # this stage's own figures, not those of an attempt before a rollback
    swd = {n: evals.get(n, {}).get("swd") for n in chain}
    prev, now = chain[-2], chain[-1]
    if "swd" not in st.cfg.eval_metrics:
        kept, why = now, "SWD is not among --eval-metrics, so the latest chain is kept"
    elif swd[now] is None or swd[prev] is None:
        kept, why = now, f"stage {prev if swd[now] is not None else now} has no SWD figure, so the latest chain is kept"
    else:
        def badness(n):  # a diverged chain's NaN is the worst figure, not an incomparable one
            v = swd[n]
            return v if v is not None and math.isfinite(v) else math.inf
        kept = min(reversed(chain), key=badness)
        if kept != now and not (run_dir / "checkpoints" / f"stage-{kept}.pt").is_file():
            kept = now
        if badness(now) > badness(prev):
            why = (f"stage {now} made SWD worse: {swd[now]:.4g} after it against {swd[prev]:.4g} after {prev}; "
                   + (f"sampling keeps the {kept} chain (SWD {swd[kept]:.4g})" if kept != now else
                      "the better stage's checkpoint is gone, so sampling uses this one"))
            log.warning("WARNING: %s", why)
        else:
            why = f"SWD {swd[now]:.4g} after {now}, {swd[prev]:.4g} after {prev}: the {kept} chain is kept"
    return {"stage": now, "kept": kept, "checkpoint": f"stage-{kept}.pt", "why": why,
            "swd": {n: swd[n] for n in chain if swd[n] is not None}}


def record_sampling_choice(run_dir: Path, choice: dict, metrics: MetricsLog) -> None:
    write_sampling_pointer(run_dir, choice["checkpoint"])
    metrics.write(choice)
    log.info("sampling default: checkpoints/%s (%s)", choice["checkpoint"], choice["why"])


def sampling_summary(run_dir: Path) -> str:
    """The checkpoint a run samples from, and why (main's closing lines)."""
    try:
        ckpt = resolve_checkpoint(run_dir)
    except UserError as e:
        return str(e)
    kept = [r for r in metrics_rows(run_dir / "metrics.jsonl") if "kept" in r]
    why = kept[-1]["why"] if kept and (run_dir / "checkpoints" / SAMPLING).is_file() else "the latest checkpoint"
    return f"{ckpt} ({why})"
