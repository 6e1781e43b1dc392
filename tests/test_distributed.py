"""Training on several processes on the CPU with gloo: the helpers of aegan_fast/distributed.py in
spawned ranks, and the trainer under real ``torchrun`` (two ranks, all three stages, a SIGTERM and
its resume, an elastic restart after a worker is SIGKILLed). Every process group has a short
collective timeout, so a hung rank fails a test instead of hanging CI."""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aegan_fast import distributed
from aegan_fast.checkpoint import load_checkpoint
from aegan_fast.distributed import World
from aegan_fast.errors import UserError
from aegan_fast.train import check_world
from conftest import make_image_folder

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch has no gloo backend")


# --------------------------------------------------------------------------- spawned ranks

def _worker(rank, world, store, case, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=5))
    try:
        result = CASES[case](rank, world)
    except Exception as e:  # the parent asserts on what each rank saw
        result = f"{type(e).__name__}: {e}"
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


def _spawn(tmp_path, case, world=2):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), case, str(tmp_path / "out")), nprocs=world,
             join=True, start_method="spawn")
    return [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=False) for r in range(world)]


def _average_gradients(rank, world):
    p = torch.nn.Parameter(torch.zeros(3, 2))
    q = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((3, 2), float(rank + 1))
    q.grad = torch.arange(4.0) * (rank + 1)
    extra = distributed.average_gradients([p, q], torch.tensor([float(rank == 1)]))
    return p.grad, q.grad, extra


def _consistency(rank, world):
    torch.manual_seed(0)
    nets = {"G": torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))}
    distributed.check_consistency(nets)  # equal: passes
    if rank == 1:
        with torch.no_grad():
            nets["G"][1].running_var[2] += 1e-7  # one buffer value off on one rank
    try:
        distributed.check_consistency(nets)
    except UserError as e:
        return str(e)
    return "no error"


def _average_buffers(rank, world):
    bn = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        bn.running_mean.fill_(float(rank))
        bn.num_batches_tracked.fill_(5)
    distributed.average_buffers({"bn": bn})
    return bn.running_mean, bn.num_batches_tracked


def _hung_rank(rank, world):
    if rank == 1:
        time.sleep(12)  # never joins: rank 0's all-reduce must fail after the 5 s timeout
        return "slept"
    t0 = time.monotonic()
    try:
        distributed.any_rank(True)
    except Exception as e:
        return ("failed", time.monotonic() - t0, type(e).__name__)
    return ("returned", time.monotonic() - t0, "")


def _helpers(rank, world):
    """The quick cases in one pair of processes (spawning one costs seconds)."""
    return {name: case(rank, world) for name, case in
            (("average_gradients", _average_gradients), ("consistency", _consistency),
             ("average_buffers", _average_buffers))}


CASES = {"helpers": _helpers, "hung_rank": _hung_rank}


@pytest.fixture(scope="module")
def helper_results(tmp_path_factory):
    results = _spawn(tmp_path_factory.mktemp("helpers"), "helpers")
    assert all(isinstance(r, dict) for r in results), results
    return results


def test_gradients_are_averaged_in_one_all_reduce_and_the_flag_summed(helper_results):
    for rank in helper_results:
        p_grad, q_grad, extra = rank["average_gradients"]
        assert torch.equal(p_grad, torch.full((3, 2), 1.5))
        assert torch.equal(q_grad, torch.arange(4.0) * 1.5)
        assert torch.equal(extra, torch.tensor([1.0]))


def test_consistency_check_names_the_first_tensor_that_differs_on_every_rank(helper_results):
    for rank in helper_results:
        assert "G.1.running_var differs from rank 0's" in rank["consistency"], rank["consistency"]


def test_running_statistics_are_averaged_and_counts_kept(helper_results):
    for rank in helper_results:
        mean, count = rank["average_buffers"]
        assert torch.equal(mean, torch.full((2,), 0.5)) and int(count) == 5


def test_a_hung_rank_fails_the_collective_after_the_timeout(tmp_path):
    outcome, waited, _ = _spawn(tmp_path, "hung_rank")[0]
    assert outcome == "failed" and 4 < waited < 11.5


def test_a_batch_the_world_does_not_divide_is_a_clear_error():
    check_world(type("C", (), {"batch": 12})(), World(0, 3))
    with pytest.raises(UserError, match="--batch 10 is the global batch and must divide by the 3 processes"):
        check_world(type("C", (), {"batch": 10})(), World(0, 3))
    with pytest.raises(UserError, match="leaves 1 image per process"):
        check_world(type("C", (), {"batch": 4})(), World(0, 4))


# --------------------------------------------------------------------------- torchrun

TINY = ["--model.ae-channels", "16", "--model.ge-base-channels", "32", "--model.embed-max-channels", "32",
        "--model.max-channels", "32", "--grid-size", "16", "--eval-n", "16", "--ema-kimg", "0.01",
        "--device", "cpu", "--no-progress", "--collective-timeout-s", "60", "--embed-steps", "2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("dist") / "images")


def _torchrun(args, nproc=2, extra=(), env=None, wait=True):
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *extra, "-m", "aegan_fast.train", *args]
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=300)


def _args(images, run, kimg, batch=8, every=0.016):
    return ["--data", str(images), "--run-dir", str(run), "--batch", str(batch),
            "--kimg", *[f"{s}={k}" for s, k in zip(("ae", "embed", "finetune"), kimg)],
            "--ckpt-every-kimg", str(every), "--sample-every-kimg", str(every), "--log-every-steps", "1", *TINY]


def _expected_images(kimg, batch):
    return sum(-(-int(k * 1000) // batch) * batch for k in kimg)


def _workers(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of a torchrun agent's worker processes."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            out[int(env["RANK"])] = int(proc.name)
    return out


def _wait_for(predicate, timeout=120, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _steps(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"losses"' in line]


def test_two_ranks_train_all_three_stages(tmp_path, images):
    run = tmp_path / "run"
    kimg = (0.032, 0.032, 0.032)
    r = _torchrun(_args(images, run, kimg) + ["--sync-bn"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes (gloo), global batch 8 = 4 per process, sync BN on" in r.stderr
    state = load_checkpoint(run)
    assert state["counters"]["stage"] == "done"
    assert state["counters"]["total_img"] == _expected_images(kimg, 8)
    assert len(state["ranks"]) == 2  # every rank's RNG and loader state, for an exact 2-rank resume
    # rank 0 alone logs, draws and evaluates: one line per step, one final grid per stage
    steps = [row["step"] for row in _steps(run)]
    assert steps == sorted(set(steps)) and len(steps) == state["counters"]["step"]
    assert sorted(p.name for p in (run / "samples").glob("*-final.png")) == \
        ["ae-final.png", "embed-final.png", "finetune-final.png"]
    assert r.stdout.count("done in") == 1


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_run_resumes(tmp_path, images):
    run = tmp_path / "run"
    kimg = (0.032, 0.4, 0.032)
    proc = _torchrun(_args(images, run, kimg), wait=False)
    try:
        _wait_for(lambda: any(r["stage"] == "embed" for r in _steps(run)), what="stage 2")
        workers = _workers(proc.pid)
        assert set(workers) == {0, 1}
        os.kill(workers[1], signal.SIGTERM)  # one rank only: the other must stop at the same step
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "exitcode  : 143" in err or "exit code 143" in err or "143" in err, err[-3000:]
    assert f"--resume {run}" in err
    stopped = load_checkpoint(run)["counters"]
    assert stopped["stage"] == "embed" and 0 < stopped["stage_img"] < 400

    r = _torchrun(["--resume", str(run), "--no-progress", "--collective-timeout-s", "60"])
    assert r.returncode == 0, r.stderr[-3000:]
    final = load_checkpoint(run)["counters"]
    assert final["stage"] == "done" and final["total_img"] == _expected_images(kimg, 8)


def test_an_elastic_restart_after_a_killed_worker_resumes_and_finishes(tmp_path, images):
    run = tmp_path / "run"
    kimg = (0.032, 0.4, 0.032)
    proc = _torchrun(_args(images, run, kimg), extra=("--max-restarts=1",), wait=False)
    try:
        _wait_for(lambda: any(r["stage"] == "embed" and r["stage_kimg"] >= 0.05 for r in _steps(run)),
                  what="a periodic checkpoint in stage 2")
        killed_at = load_checkpoint(run)["counters"]["total_img"]
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "elastic restart 1: continuing" in err
    final = load_checkpoint(run)["counters"]
    assert final["stage"] == "done" and final["total_img"] == _expected_images(kimg, 8)
    assert killed_at > 32  # it resumed from a stage-2 checkpoint, not from the start
