"""Runs that survive: a run stopped anywhere and resumed ends bit-identical to one that never stopped
(in-process, every stage and both stage boundaries), and the CLI under SIGKILL, SIGTERM and SIGINT.

The uninterrupted runs are shared between cases (module-scoped fixtures), so the file stays fast.
Bit-identical means torch.equal on every tensor of the final checkpoint: nets, EMA (parameters and
buffers, num_batches_tracked included), each optimizer's state and param_groups, counters, the
loader's position and the RNG states (torch, the data generator, python, numpy).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aegan_fast.training import stages
from aegan_fast.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from aegan_fast.data import load_folder
from aegan_fast.training import train
from aegan_fast.training.run_log import metrics_rows
from conftest import make_image_folder, tiny_config

# The demo's settings where they matter (4 G_E/D_E steps per φ step draw extra real embeddings from
# the data generator; EMA on), with 3 steps a stage at batch 4:
#   steps 1-3 ae, 4-6 embed, 7-9 finetune.
STEPS_PER_STAGE = 3
RESUME = dict(embed_steps=4, ema_kimg=0.01, kimg={"ae": 0.012, "embed": 0.012, "finetune": 0.012},
              ckpt_every_kimg=0.008)
STAGE_AT_STEP = {s: ("ae", "embed", "finetune")[(s - 1) // STEPS_PER_STAGE] for s in range(1, 10)}


def resume_config():
    return tiny_config(**RESUME)


def assert_identical(a, b, where="checkpoint") -> None:
    """Every tensor torch.equal (dtype and shape included), every other value ==, the same keys."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where} differs (max |Δ| {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_complete_training_state(state: dict) -> None:
    """What a bit-identical comparison must cover is really there (so assert_identical is not
    vacuously comparing two empty things)."""
    assert state["ema"] is not None and set(state["ema"]) == set(stages.EMA.NETS)
    assert any(k.endswith("num_batches_tracked") for k in state["ema"]["F"])
    with_phi = {"phi"} if state["config"]["model"]["denoiser"] else set()  # the demo preset has none
    assert set(state["opts"]) == {"H", "F", "G_E", "D_E", "D_R"} | with_phi
    for name, opt in state["opts"].items():
        assert opt["state"], f"{name}: no Adam moments"
        for moments in opt["state"].values():
            assert {"exp_avg", "exp_avg_sq", "step"} <= set(moments), name
        assert all("lr" in g for g in opt["param_groups"]), name
    assert {"torch", "data", "python", "numpy"} <= set(state["rng"])
    assert state["loader"]["consumed"] == state["counters"]["total_img"]


# --------------------------------------------------------------------------- in-process, exact

@pytest.fixture(scope="module")
def resume_world(tmp_path_factory):
    """(data, root) for the module: one image set, prepared once into a module-private cache."""
    root = tmp_path_factory.mktemp("resume")
    images = make_image_folder(root / "images")
    return load_folder(images, 64, cache=root / "cache", progress=False), root


@pytest.fixture(scope="module")
def straight(resume_world):
    """The final checkpoint of the run that never stopped (9 steps), and its run directory."""
    data, root = resume_world
    run = root / "straight"
    run.mkdir()
    train(resume_config(), run, progress=False, data=data)
    state = load_checkpoint(run)
    assert state["counters"] == {"stage": "done", "stage_img": 0, "stage_s": 0.0, "total_img": 36, "step": 9}
    assert_complete_training_state(state)
    return state, run


def _stopped(data, run: Path, steps: int, resume: bool = False) -> dict:
    train(resume_config(), run, resume=resume, progress=False, data=data, stop_after_steps=steps)
    counters = load_checkpoint(run)["counters"]
    assert counters.pop("stage_s") > 0  # time, not part of the bit-identical state (the stage's --minutes budget)
    return counters


# 5 and 8: inside embed (after one of its periodic checkpoints) and finetune (inside ae: the run
# resumed twice below); 3 and 6: right after the last step of ae / embed, before the stage's end
# (its evaluation, grid and stage-*.pt), so the resumed run finishes that stage and starts the next.
# The fast tier keeps 5; the full suite runs them all.
@pytest.mark.parametrize("stop_at", [5, *(pytest.param(s, marks=pytest.mark.slow) for s in (8, 3, 6))])
def test_resume_is_bit_identical_to_an_uninterrupted_run(resume_world, straight, tmp_path, stop_at):
    data, _ = resume_world
    mid = _stopped(data, tmp_path, stop_at)
    in_stage = (stop_at - 1) % STEPS_PER_STAGE + 1
    assert mid == {"stage": STAGE_AT_STEP[stop_at], "stage_img": 4 * in_stage, "total_img": 4 * stop_at,
                   "step": stop_at}
    train(resume_config(), tmp_path, resume=True, progress=False, data=data)
    assert_identical(straight[0], load_checkpoint(tmp_path))


@pytest.mark.slow
def test_a_run_resumed_twice_is_bit_identical(resume_world, straight, tmp_path):
    """Stopped in ae, then again in finetune (the second call crosses the embed stage whole), then
    finished."""
    data, _ = resume_world
    assert _stopped(data, tmp_path, 2)["step"] == 2
    assert _stopped(data, tmp_path, 5, resume=True) == {"stage": "finetune", "stage_img": 4, "total_img": 28,
                                                        "step": 7}
    train(resume_config(), tmp_path, resume=True, progress=False, data=data)
    assert_identical(straight[0], load_checkpoint(tmp_path))


def test_resume_from_a_stage_end_checkpoint_is_bit_identical(resume_world, straight, tmp_path):
    """A stage-end checkpoint says "the next stage, 0 images in" (saved after the stage's evaluation
    and grid): the resumed run starts finetune as the uninterrupted one did (fresh moments for F)."""
    data, _ = resume_world
    stage = "embed"
    save_checkpoint(tmp_path, f"stage-{stage}.pt", load_checkpoint(straight[1] / "checkpoints" / f"stage-{stage}.pt"))
    assert load_checkpoint(tmp_path)["counters"]["stage_img"] == 0
    train(resume_config(), tmp_path, resume=True, progress=False, data=data)
    assert_identical(straight[0], load_checkpoint(tmp_path))


# Augmentation on both discriminators, p adaptive and quick to move, adjusted every third D step (D_E
# takes 4 a step in embed): stopped at step 5, both pipes are inside an interval, their r_t sums unfinished.
AUGMENTED = dict(augment={"D_E": "translation_reflect,cutout", "D_R": "diffaugment,geometric"}, augment_p="adaptive",
                 augment_target=0.1, augment_interval=3, augment_speed_kimg=0.05)


def test_resume_with_adaptive_augmentation_is_bit_identical(resume_world, tmp_path):
    data, _ = resume_world
    straight_run, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight_run.mkdir()
    stopped.mkdir()
    train(tiny_config(**RESUME, **AUGMENTED), straight_run, progress=False, data=data)
    final = load_checkpoint(straight_run)
    assert_complete_training_state(final)
    assert set(final["augment"]) == {"D_E", "D_R"}
    logged = [r["aug_p"] for r in metrics_rows(straight_run / "metrics.jsonl") if "aug_p" in r]
    assert logged and any(p > 0 for row in logged for p in row.values()), logged  # p did move
    train(tiny_config(**RESUME, **AUGMENTED), stopped, progress=False, data=data, stop_after_steps=5)
    assert all(pipe["calls"] % 3 for pipe in load_checkpoint(stopped)["augment"].values())
    train(tiny_config(**RESUME, **AUGMENTED), stopped, resume=True, progress=False, data=data)
    assert_identical(final, load_checkpoint(stopped))


def test_resume_with_stage_1s_adversarial_term_is_bit_identical(resume_world, tmp_path):
    """D_AE's weights, spectral-norm vectors and Adam moments come back exactly: a stage-1-only run
    stopped after the term's first step (step 2 of 3; step 1 is its warm-up) ends as one that never stopped."""
    data, _ = resume_world
    cfg = dataclasses.replace(resume_config(), stages=("ae",), ae_adv_weight=0.5, ae_adv_start_kimg=0.004)
    (tmp_path / "straight").mkdir()
    train(cfg, tmp_path / "straight", progress=False, data=data)
    straight = load_checkpoint(tmp_path / "straight")
    assert straight["counters"]["step"] == 3 and straight["opts"]["D_AE"]["state"]
    assert any(k.endswith("_u") for k in straight["nets"] if k.startswith("D_AE."))
    train(cfg, tmp_path, progress=False, data=data, stop_after_steps=2)
    assert load_checkpoint(tmp_path)["counters"]["step"] == 2
    train(cfg, tmp_path, resume=True, progress=False, data=data)
    assert_identical(straight, load_checkpoint(tmp_path))


def _signalled_in_embed_step(m: pytest.MonkeyPatch, signals: int, sig: int = signal.SIGINT):
    """The run's first embed step gets sig (SIGINT: as Ctrl-C lands during a step) in its middle: once
    at its start, and with ``signals=2`` again right after D_E's first update (G_E not yet stepped).
    The handlers run in the step itself, between two of its bytecodes."""
    calls, g_calls = [], []
    g_loss = stages.losses.g_loss

    def second_signal(*args, **kw):
        g_calls.append(1)
        if len(calls) == 1 and len(g_calls) == 1 and signals == 2:
            os.kill(os.getpid(), sig)
        return g_loss(*args, **kw)

    def step(*args):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), sig)
        return stages.EMBED.step(*args)

    m.setitem(stages.STAGES, "embed", dataclasses.replace(stages.EMBED, step=step))
    m.setattr(stages.losses, "g_loss", second_signal)


def test_ctrl_c_finishes_the_step_saves_it_and_the_run_resumes_bit_identical(resume_world, straight, tmp_path):
    from aegan_fast.errors import Interrupted  # imported here: the rest of the file runs without it
    data, _ = resume_world
    with pytest.MonkeyPatch.context() as m, pytest.raises(Interrupted) as e:
        _signalled_in_embed_step(m, 1)
        train(resume_config(), tmp_path, progress=False, data=data)
    assert e.value.signum == signal.SIGINT and f"--resume {tmp_path}" in str(e.value)
    # step 4 finished and saved; the checkpoint before it was stage-ae.pt at step 3
    counters = load_checkpoint(tmp_path)["counters"]
    assert counters.pop("stage_s") > 0  # the stage's training time so far: a --minutes budget resumes from it
    assert counters == {"stage": "embed", "stage_img": 4, "total_img": 16, "step": 4}
    train(resume_config(), tmp_path, resume=True, progress=False, data=data)
    assert_identical(straight[0], load_checkpoint(tmp_path))


def test_a_second_ctrl_c_stops_at_once_and_saves_no_half_step(resume_world, straight, tmp_path):
    """The second Ctrl-C cuts the step short (some nets stepped, others not): nothing of it may be
    saved. `latest` stays the last complete checkpoint and the run resumes from it, bit-identical."""
    data, _ = resume_world
    with pytest.MonkeyPatch.context() as m, pytest.raises(KeyboardInterrupt):
        _signalled_in_embed_step(m, 2)
        train(resume_config(), tmp_path, progress=False, data=data)
    assert latest_checkpoint(tmp_path).name == "stage-ae.pt"
    assert load_checkpoint(tmp_path)["counters"] == {"stage": "embed", "stage_img": 0, "stage_s": 0.0, "total_img": 12, "step": 3}
    train(resume_config(), tmp_path, resume=True, progress=False, data=data)
    assert_identical(straight[0], load_checkpoint(tmp_path))


# --------------------------------------------------------------------------- the CLI under signals

TINY_NETS = ["--model.ae-channels", "16", "--model.ge-base-channels", "32", "--model.embed-max-channels", "32",
             "--model.max-channels", "32"]


def cli_args(images: Path, kimg: dict, ckpt_every_kimg: float) -> list:
    return ["--data", str(images), "--batch", "4", *TINY_NETS, "--kimg", *[f"{k}={v}" for k, v in kimg.items()],
            "--embed-steps", "4", "--ema-kimg", "0.01", "--ckpt-every-kimg", str(ckpt_every_kimg),
            "--sample-every-kimg", "0", "--log-every-steps", "1", "--grid-size", "16", "--eval-n", "16",
            "--no-progress", "--device", "cpu"]


class Trainer:
    """``python -m aegan_fast.train`` in a subprocess, its output in files (no pipe to fill up)."""

    def __init__(self, args: list, log: Path, cache: Path):
        self.out, self.err = log.with_suffix(".out"), log.with_suffix(".err")
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "aegan_fast.train", *args], stdout=out, stderr=err,
                                         env=dict(os.environ, AEGAN_CACHE=str(cache)))

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.err.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_cli(args: list, log: Path, cache: Path) -> Trainer:
    t = Trainer(args, log, cache)
    rc = t.wait()
    assert rc == 0, t.stderr()[-3000:]
    return t


def pointed_checkpoint(run: Path) -> str | None:
    """The name of the checkpoint `latest` commits right now (None before the first one)."""
    path = latest_checkpoint(run)
    return path.name if path is not None else None


def wait_until(trainer: Trainer, condition, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if trainer.proc.poll() is not None:
            pytest.fail(f"the trainer exited ({trainer.proc.returncode}) before {what}:\n{trainer.stderr()[-3000:]}")
        time.sleep(0.005)
    trainer.kill()
    pytest.fail(f"timed out waiting for {what}")


def periodic_in(run: Path, after_img: int):
    """The periodic checkpoint `latest` names, once it is one past after_img images (its total)."""
    name = pointed_checkpoint(run)
    if name and name.startswith("ckpt-") and 4 * checkpoint_step(name) > after_img:
        return name
    return None


def checkpoint_step(name: str) -> int:
    """The step of a periodic checkpoint, from its name (ckpt-<images seen>.pt, batch 4)."""
    return int(name.removeprefix("ckpt-").removesuffix(".pt")) // 4


def metrics_steps(run: Path) -> list:
    """Steps of the metrics rows written so far (a row being appended right now is left out)."""
    path = run / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [r["step"] for r in map(json.loads, lines) if "losses" in r]


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_image_folder(root / "images"), root / "cache", root


# 2 ae steps, 12 embed steps (periodic checkpoints every 4 of them, so a signal lands between two),
# 2 finetune steps.
SIGNAL_KIMG = {"ae": 0.008, "embed": 0.048, "finetune": 0.008}
SIGNAL_CKPT_KIMG = 0.016


@pytest.fixture(scope="module")
def cli_straight(cli_world):
    """The final checkpoint of the signal tests' config, trained by the CLI without a stop."""
    images, cache, root = cli_world
    run = root / "straight"
    run_cli(["--run-dir", str(run), *cli_args(images, SIGNAL_KIMG, SIGNAL_CKPT_KIMG)], root / "straight", cache)
    state = load_checkpoint(run)
    assert state["counters"] == {"stage": "done", "stage_img": 0, "stage_s": 0.0, "total_img": 64, "step": 16}
    assert_complete_training_state(state)
    return state


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_finishes_with_the_configured_image_count(cli_world, tmp_path):
    """kill -9 in the middle of stage 2, a step after a periodic checkpoint: `latest` still names a
    whole checkpoint (its digest checked on load), and --resume
    finishes the run with exactly the configured images per stage. What is lost: the steps finished
    since that checkpoint (at most one checkpoint interval, 2 steps here); the resumed run trains
    them again."""
    images, cache, _ = cli_world
    run = tmp_path / "run"
    # lengths that are not whole batches: 30 images take 8 steps of 4 (32), 10 take 3 (12)
    kimg = {"ae": 0.030, "embed": 0.030, "finetune": 0.010}
    per_stage = {"ae": 32, "embed": 32, "finetune": 12}
    args = cli_args(images, kimg, 0.008)
    t = Trainer(["--run-dir", str(run), *args], tmp_path / "killed", cache)
    try:
        wait_until(t, lambda: periodic_in(run, per_stage["ae"]), "a periodic checkpoint inside stage 2")
        periodic_step = checkpoint_step(pointed_checkpoint(run))
        wait_until(t, lambda: max(metrics_steps(run), default=0) > periodic_step, "a step after that checkpoint")
        t.proc.send_signal(signal.SIGKILL)  # between two checkpoints
        assert t.wait() == -signal.SIGKILL
    finally:
        t.kill()
    name = pointed_checkpoint(run)
    assert name.endswith(".pt") and not name.endswith(".tmp") and not name.startswith(".")
    state = load_checkpoint(run)  # loads: the checkpoint `latest` names is complete
    c = state["counters"]
    assert c["stage"] == "embed" and 0 < c["stage_img"] < per_stage["embed"], c
    lost = max(metrics_steps(run)) - c["step"]  # steps the killed run finished after that checkpoint
    assert 0 <= lost <= 2, lost  # 0.008 kimg at batch 4: one interval is 2 steps

    r = Trainer(["--resume", str(run), "--device", "cpu"], tmp_path / "resumed", cache)
    assert r.wait() == 0, r.stderr()[-3000:]
    assert not list((run / "checkpoints").glob("*.tmp"))  # a temp file the kill left is cleared, never used
    final = load_checkpoint(run)["counters"]
    assert final == {"stage": "done", "stage_img": 0, "stage_s": 0.0, "total_img": sum(per_stage.values()),
                     "step": sum(per_stage.values()) // 4}
    total = 0
    for stage, images_in_stage in per_stage.items():  # each stage's own end saw exactly its length
        total += images_in_stage
        assert load_checkpoint(run / "checkpoints" / f"stage-{stage}.pt")["counters"]["total_img"] == total, stage


def _interrupt_mid_stage_2(images, cache, run: Path, log: Path, sig: int) -> tuple[Trainer, int]:
    """Start the signal tests' run, wait until it is inside stage 2 past a periodic checkpoint,
    send sig. Returns the trainer and the last step it had logged before the signal."""
    t = Trainer(["--run-dir", str(run), *cli_args(images, SIGNAL_KIMG, SIGNAL_CKPT_KIMG)], log, cache)
    ae_img = int(SIGNAL_KIMG["ae"] * 1000)
    wait_until(t, lambda: periodic_in(run, ae_img), "a periodic checkpoint inside stage 2")
    periodic_step = checkpoint_step(pointed_checkpoint(run))
    wait_until(t, lambda: max(metrics_steps(run), default=0) > periodic_step, "a step after that checkpoint")
    t.proc.send_signal(sig)
    return t, periodic_step


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_stage_saves_that_step_exits_128_plus_n_and_resumes_bit_identical(
        cli_world, cli_straight, tmp_path, sig, code):
    """SIGTERM (what schedulers and torchrun send) and SIGINT: the trainer finishes the step it is in,
    checkpoints exactly that step, prints the resume command and exits 128 + n; --resume then ends
    bit-identical to the uninterrupted run."""
    images, cache, _ = cli_world
    run = tmp_path / "run"
    t, periodic_step = _interrupt_mid_stage_2(images, cache, run, tmp_path / "signalled", sig)
    try:
        rc = t.wait()
    finally:
        t.kill()
    err = t.stderr()
    assert rc == code, err[-3000:]
    assert any(f"--resume {run}" in line for line in err.splitlines()), err[-3000:]
    c = load_checkpoint(run)["counters"]
    embed_img = int(SIGNAL_KIMG["embed"] * 1000)
    assert c["stage"] == "embed" and 0 < c["stage_img"] < embed_img, c
    assert c["step"] > periodic_step  # the step it reached, not the older periodic checkpoint
    assert c["step"] == max(metrics_steps(run))  # the last step it finished is the one saved

    if sig == signal.SIGINT:
        return  # resumed like SIGTERM's; the in-process Ctrl-C tests prove that one bit-identical
    r = Trainer(["--resume", str(run), "--device", "cpu"], tmp_path / "resumed", cache)
    assert r.wait() == 0, r.stderr()[-3000:]
    assert_identical(cli_straight, load_checkpoint(run))


def test_a_second_sigterm_during_the_checkpoint_write_leaves_latest_loadable(resume_world, tmp_path, capsys):
    """Impatient schedulers signal twice. The first SIGTERM lands in the middle of the first embed
    step (step 4, no periodic checkpoint after it); the second is sent from inside the write of the
    checkpoint the first one asked for, its temp file open: it is ignored, the write completes,
    `latest` commits a whole checkpoint of step 4 and the CLI exits 143. In process, so the second
    signal lands in the write every time."""
    from aegan_fast import checkpoint
    from aegan_fast.train import main as train_main
    from aegan_fast.training import loop
    _, root = resume_world
    run = tmp_path / "run"
    handled, writing = [], []  # (signal, the files being written when its handler ran)
    real_handle, real_write = loop.StopSignals._handle, checkpoint.atomic_write_bytes

    def handle(self, signum, frame):
        handled.append((signum, list(writing)))
        real_handle(self, signum, frame)

    def write(path, fill):
        def signalled_fill(f):
            writing.append(path.name)
            if len(handled) == 1 and path.suffix == ".pt":  # the first signal's checkpoint
                os.kill(os.getpid(), signal.SIGTERM)
            fill(f)
            writing.pop()
        return real_write(path, signalled_fill)

    with pytest.MonkeyPatch.context() as m, pytest.raises(SystemExit) as e:
        m.setattr(loop.StopSignals, "_handle", handle)
        m.setattr(checkpoint, "atomic_write_bytes", write)
        _signalled_in_embed_step(m, 1, signal.SIGTERM)
        train_main(["--run-dir", str(run), *cli_args(root / "images", RESUME["kimg"], RESUME["ckpt_every_kimg"])])
    saved = "ckpt-000000016.pt"  # 4 steps of 4 images
    assert handled == [(signal.SIGTERM, []), (signal.SIGTERM, [saved])]
    assert e.value.code == 128 + signal.SIGTERM
    assert f"SIGTERM: saved {run / 'checkpoints' / saved} at step 4" in capsys.readouterr().err
    assert pointed_checkpoint(run) == saved
    counters = load_checkpoint(run)["counters"]  # loads, its digest checked
    assert counters.pop("stage_s") > 0
    assert counters == {"stage": "embed", "stage_img": 4, "total_img": 16, "step": 4}
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
