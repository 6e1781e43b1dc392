"""Training on several processes on the CPU with gloo: the helpers of aegan_fast/distributed.py in
spawned ranks, the trainer in spawned ranks (rank 0's stage-end work failing or outlasting the
collective timeout; the DALI loader's per-rank state across a resume), and the trainer under real
``torchrun`` (two ranks, all three stages, a SIGTERM and its resume, an elastic restart after a
worker is SIGKILLed). Every process group has a short collective timeout, so a hung rank fails a
test instead of hanging CI."""
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
from aegan_fast.data import dali_unavailable, load_dataset
from aegan_fast.distributed import World
from aegan_fast.errors import UserError
from aegan_fast.training import check_world
from conftest import make_image_folder, tiny_config

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch has no gloo backend")


# --------------------------------------------------------------------------- spawned ranks

def _worker(rank, world, store, case, out, timeout_s, kw):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # as torchrun sets it: ranks whose OpenMP threads outnumber the cores crawl
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = CASES[case](rank, world, **kw)
    except Exception as e:  # the parent asserts on what each rank saw
        result = f"{type(e).__name__}: {e}"
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


def _spawn(tmp_path, case, world=2, timeout_s=5, **kw):
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), case, str(tmp_path / "out"), timeout_s, kw),
             nprocs=world, join=True, start_method="spawn")
    return [torch.load(f"{tmp_path / 'out'}.{r}", weights_only=False) for r in range(world)]


def _spy_on_launches() -> list[bool]:
    """In this (spawned) process, each bucket's launch appends whether it left from inside the
    backward (a gradient's hook) rather than after it."""
    launches: list[bool] = []
    inside = [False]
    arrived, launch = distributed.GradientReducer._arrived, distributed.GradientReducer._launch

    def spy_arrived(self, p):
        inside[0] = True
        try:
            arrived(self, p)
        finally:
            inside[0] = False

    def spy_launch(self, i, extra=None):
        launches.append(inside[0])
        launch(self, i, extra)
    distributed.GradientReducer._arrived, distributed.GradientReducer._launch = spy_arrived, spy_launch
    return launches


def _gradient_buckets(rank, world):
    """One backward per bucket size: each rank's gradients are (rank + 1) × a known tensor, so the
    mean is exactly 1.5 × it; the flag rides along summed; which buckets left during the backward."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3), torch.nn.Linear(3, 2))
    unused = torch.nn.Parameter(torch.ones(2))  # an optimizer's parameter the loss never reaches
    params = [unused] + list(net.parameters())  # buckets run in reverse: it comes last
    x = torch.randn(4, 5)
    out = {}
    launches = _spy_on_launches()
    for bucket_bytes in (0, 1, 2 ** 20):  # one after the backward; one per parameter; one in all
        reducer = distributed.GradientReducer(bucket_bytes)
        for p in params:
            p.grad = None
        launches.clear()
        reducer.begin(params)
        (net(x).square().sum() * (rank + 1)).backward()
        local = [p.grad.clone() for p in net.parameters()]
        flag = reducer.finish(torch.tensor([float(rank == 1)]))
        out[bucket_bytes] = (local, [p.grad for p in net.parameters()], unused.grad, flag, list(launches))
    return out


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


def _main_only(rank, world):
    ran = []
    value = distributed.main_only(lambda: ran.append(rank) or 42, "a look")
    errors = []
    for exc in (UserError("the disk is full"), ValueError("bad value")):
        def fail(exc=exc):
            raise exc
        try:
            distributed.main_only(fail, "the grid")
            errors.append("no error")
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    try:  # a rank 0 slower than the wait's own deadline
        distributed.main_only(lambda: time.sleep(1.5), "a slow look", wait_s=0.3)
        errors.append("no error")
    except UserError as e:
        errors.append(str(e))
    distributed.any_rank(False)  # a collective after all that: every rank is still in step
    return value, ran, errors


def _metrics_mean(rank, world):
    """Two ranks log different losses over a two-step interval; rank 0 writes the row."""
    import tempfile
    from aegan_fast.training.run_log import MetricsLog
    folder = Path(tempfile.mkdtemp())
    # rank 1 is blocked on all-reduces the whole interval, rank 0 never
    log = MetricsLog(folder / "metrics.jsonl", "cpu", enabled=rank == 0, comm_clock=lambda: time.perf_counter() * rank)
    for step in range(2):
        log.add({"l1": torch.tensor(float(rank + 1) * (step + 1)), "adv": torch.tensor(-2.0 * rank)}, 4, 0.0)
    time.sleep(0.2)
    row = log.flush("ae", {"total_img": 8, "stage_img": 8, "step": 2})
    written = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").exists() else []
    return row["losses"], row["comm_wait"], written


def _helpers(rank, world):
    """The quick cases in one pair of processes (spawning one costs seconds)."""
    return {name: case(rank, world) for name, case in
            (("gradient_buckets", _gradient_buckets), ("consistency", _consistency),
             ("average_buffers", _average_buffers), ("main_only", _main_only), ("metrics_mean", _metrics_mean))}


def _rank0_stage_end(rank, world, cfg, images, run, mode):
    """The trainer on each rank, rank 0's stage-end evaluation failing (mode "raise") or taking
    longer than the collective timeout ("sleep")."""
    import aegan_fast.training.loop as trainer
    if rank == 0:
        real = trainer.stage_end_evaluation

        def evaluation(stage, st):
            if mode == "raise":
                raise UserError("the evaluation's disk is full")
            time.sleep(SLOW_EVAL_S)
            return real(stage, st)
        trainer.stage_end_evaluation = evaluation
    t0 = time.monotonic()
    trainer.train(cfg, Path(run), progress=False, data=load_dataset(images, 64))
    return ("finished", time.monotonic() - t0)


class _Recording:
    """A loader that records what each batch held."""

    def __init__(self, inner, seen):
        self.inner, self.seen = inner, seen

    def __next__(self):
        x, idx, mirror = next(self.inner)
        self.seen.append((idx.tolist(), mirror.tolist(), x.clone()))
        return x, idx, mirror

    def __getattr__(self, name):  # state_dict, close
        return getattr(self.inner, name)


def _dali_runs(rank, world, cfg, images, runs):
    """An uninterrupted 2-rank DALI run, and one stopped after 4 steps and resumed; each rank's batches."""
    import aegan_fast.training.loop as trainer
    real = trainer.make_loader
    seen: dict = {"straight": [], "split": []}
    data = load_dataset(images, 64)
    for name, kw in (("straight", {}), ("split", dict(stop_after_steps=4)), ("split", dict(resume=True))):
        trainer.make_loader = lambda *a, name=name, **k: _Recording(real(*a, **k), seen[name])
        (Path(runs) / name).mkdir(exist_ok=True)
        trainer.train(cfg, Path(runs) / name, progress=False, data=data, **kw)
    return seen


def _bucketed_runs(rank, world, cfg, images, runs, mbs=(0.0, 1e-9)):
    """The same 2-rank run through all three stages, its gradients averaged in one all-reduce per
    backward (0) and in buckets of one parameter each, sent during the backward; the count of the
    buckets that left before their backward ended."""
    import aegan_fast.training.loop as trainer
    data = load_dataset(images, 64)
    launches = _spy_on_launches()
    for mb in mbs:
        cfg.grad_bucket_mb = mb
        (Path(runs) / str(mb)).mkdir(exist_ok=True)  # both ranks make it
        trainer.train(cfg, Path(runs) / str(mb), progress=False, data=data)
    return sum(launches)


SLOW_EVAL_S = 10  # rank 0's stage-end evaluation in the "sleep" case: far longer than the timeout below
CASES = {"helpers": _helpers, "hung_rank": _hung_rank, "rank0_stage_end": _rank0_stage_end, "dali_runs": _dali_runs,
         "bucketed_runs": _bucketed_runs}


@pytest.fixture(scope="module")
def helper_results(tmp_path_factory):
    results = _spawn(tmp_path_factory.mktemp("helpers"), "helpers")
    assert all(isinstance(r, dict) for r in results), results
    return results


@pytest.mark.slow
def test_gradients_are_averaged_bucket_by_bucket_during_the_backward_and_the_flag_summed(helper_results):
    for rank in helper_results:
        for bucket_bytes, (_, averaged, unused, flag, launches) in rank["gradient_buckets"].items():
            for g0, g1, mean in zip(helper_results[0]["gradient_buckets"][bucket_bytes][0],
                                    helper_results[1]["gradient_buckets"][bucket_bytes][0], averaged):
                assert torch.equal(g1, 2 * g0)  # rank 1's loss is twice rank 0's
                assert torch.equal(mean, (g0 + g1) / 2), bucket_bytes
            assert unused is None and torch.equal(flag, torch.tensor([1.0]))
            # 0: one all-reduce after the backward; 1 byte: every parameter its own bucket, all but the
            # last (the unused one, with the flag) sent while the backward ran; 1 MiB: one, after it
            expected = {0: [False], 1: [True] * 6 + [False], 2 ** 20: [False]}[bucket_bytes]
            assert launches == expected, (bucket_bytes, launches)


@pytest.mark.slow
def test_bucketed_gradients_train_bit_for_bit_as_one_all_reduce_does(tmp_path, images):
    load_dataset(str(images), 64)
    cfg = tiny_config(sample_every_kimg=0, ckpt_every_kimg=0, eval_metrics=(), loader="torch", loader_workers=0,
                      embed_steps=2, kimg={"ae": 0.008, "embed": 0.016, "finetune": 0.008})
    early = _spawn(tmp_path, "bucketed_runs", timeout_s=30, cfg=cfg, images=str(images), runs=str(tmp_path))
    assert all(isinstance(n, int) and n > 100 for n in early), early  # buckets did leave during backwards
    one, bucketed = load_checkpoint(tmp_path / "0.0"), load_checkpoint(tmp_path / "1e-09")
    assert one["counters"] == bucketed["counters"] and one["counters"]["stage"] == "done"
    for k in one["nets"]:
        assert torch.equal(one["nets"][k], bucketed["nets"][k]), k
    for net, state in one["ema"].items():
        for k in state:
            assert torch.equal(state[k], bucketed["ema"][net][k]), (net, k)
    for name, opt in one["opts"].items():
        for i, s in opt["state"].items():
            for key in s:
                assert torch.equal(s[key], bucketed["opts"][name]["state"][i][key]), (name, i, key)


@pytest.mark.slow
def test_consistency_check_names_the_first_tensor_that_differs_on_every_rank(helper_results):
    for rank in helper_results:
        assert "G.1.running_var differs from rank 0's" in rank["consistency"], rank["consistency"]


@pytest.mark.slow
def test_running_statistics_are_averaged_and_counts_kept(helper_results):
    for rank in helper_results:
        mean, count = rank["average_buffers"]
        assert torch.equal(mean, torch.full((2,), 0.5)) and int(count) == 5


@pytest.mark.slow
def test_a_hung_rank_fails_the_collective_after_the_timeout(tmp_path):
    outcome, waited, _ = _spawn(tmp_path, "hung_rank")[0]
    assert outcome == "failed" and 4 < waited < 11.5


@pytest.mark.slow
def test_rank_0_only_work_publishes_its_outcome_to_every_rank(helper_results):
    (value0, ran0, errors0), (value1, ran1, errors1) = (r["main_only"] for r in helper_results)
    assert (value0, ran0, value1, ran1) == (42, [0], None, [])  # run on rank 0 alone, its value there
    assert errors0[:2] == ["UserError: the disk is full", "ValueError: bad value"]  # rank 0: its own errors
    assert errors1[:2] == ["UserError: rank 0: the disk is full",
                           "MainRankFailed: rank 0 failed in the grid: ValueError: bad value "
                           "(its traceback is in rank 0's output)"]
    assert errors0[2] == "no error" and errors1[2].startswith("rank 1 waited 0 s for rank 0 to finish a slow look")


@pytest.mark.slow
def test_logged_losses_and_comm_wait_are_the_mean_over_the_ranks_and_rank_0_writes_them(helper_results):
    (losses0, comm0, written0), (losses1, comm1, written1) = (r["metrics_mean"] for r in helper_results)
    # rank 0: l1 1 then 2 (mean 1.5), rank 1: 2 then 4 (mean 3); adv 0 and -2
    assert losses0 == losses1 == {"l1": 2.25, "adv": -1.0}
    assert comm0 == comm1 and comm0 == pytest.approx(0.5, abs=0.01)  # the ranks' mean share of the interval
    assert len(written0) == 1 and json.loads(written0[0])["losses"] == losses0 and written1 == []


def test_main_only_is_a_plain_call_on_one_process():
    assert not dist.is_initialized()
    assert distributed.main_only(lambda: 7, "a look") == 7
    with pytest.raises(ValueError, match="boom"):
        distributed.main_only(lambda: (_ for _ in ()).throw(ValueError("boom")), "a look")


STAGE_END_TIMEOUT_S = 4  # the collective timeout of the stage-end cases: well under SLOW_EVAL_S


def _stage_end_case(tmp_path, images, mode):
    load_dataset(str(images), 64)  # the parent prepares the data set once: both ranks only read it
    cfg = tiny_config(stages=("ae",), kimg={"ae": 0.008}, sample_every_kimg=0, ckpt_every_kimg=0,
                      loader="torch", loader_workers=0)
    run = tmp_path / "run"
    run.mkdir()
    return run, _spawn(tmp_path, "rank0_stage_end", timeout_s=STAGE_END_TIMEOUT_S, cfg=cfg, images=str(images),
                       run=str(run), mode=mode)


@pytest.mark.slow
def test_rank_0s_stage_end_error_stops_every_rank_with_its_message(tmp_path, images):
    _, (rank0, rank1) = _stage_end_case(tmp_path, images, "raise")
    assert rank0 == "UserError: the evaluation's disk is full"
    assert rank1 == "UserError: rank 0: the evaluation's disk is full"  # not the collective timeout


@pytest.mark.slow
def test_a_stage_end_evaluation_longer_than_the_collective_timeout_does_not_fail_the_others(tmp_path, images):
    run, results = _stage_end_case(tmp_path, images, "sleep")
    for outcome in results:
        assert isinstance(outcome, tuple) and outcome[0] == "finished", outcome
        assert outcome[1] > SLOW_EVAL_S  # every rank waited for rank 0's evaluation
    state = load_checkpoint(run)
    assert state["counters"]["stage"] == "done" and len(state["ranks"]) == 2
    assert (run / "samples" / "ae-final.png").is_file() and (run / "losses.png").is_file()


@pytest.mark.slow
@pytest.mark.skipif(dali_unavailable() is not None, reason=f"DALI not installed: {dali_unavailable()}")
def test_two_rank_dali_runs_resume_exactly_from_each_ranks_reader_state(tmp_path, images):
    """2 ranks × 2 images a step over 12 images: DALI shards by rank (6 files each, 3 steps an epoch);
    the split run stops in its second epoch, mid-shuffle, and each rank resumes from its own reader
    checkpoint in the ``ranks`` entry. The same batches, bit for bit, hence (deterministic gloo
    reductions in a fixed order) the same weights bit for bit."""
    load_dataset(str(images), 64)
    cfg = tiny_config(loader="dali", stages=("ae",), kimg={"ae": 0.024}, sample_every_kimg=0, ckpt_every_kimg=0,
                      eval_metrics=(), loader_workers=1)
    seen = _spawn(tmp_path, "dali_runs", timeout_s=30, cfg=cfg, images=str(images), runs=str(tmp_path))
    assert all(isinstance(s, dict) for s in seen), seen
    for name in ("straight", "split"):
        steps = list(zip(seen[0][name], seen[1][name]))
        assert len(steps) == 6
        for epoch in (steps[:3], steps[3:]):  # the two ranks' shards: disjoint, together the whole set
            ids = [i for pair in epoch for idx, _, _ in pair for i in idx]
            assert sorted(ids) == list(range(12)), ids
        assert [s[0][0] for s in steps[:3]] != [s[0][0] for s in steps[3:]]  # reshuffled after the epoch
    for rank in (0, 1):
        for (ia, ma, xa), (ib, mb, xb) in zip(seen[rank]["straight"], seen[rank]["split"], strict=True):
            assert ia == ib and ma == mb and torch.equal(xa, xb)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    assert a["counters"] == b["counters"] and a["counters"]["stage"] == "done"
    assert [r["loader"]["kind"] for r in b["ranks"]] == ["dali", "dali"]
    for k in a["nets"]:
        if "running_" in k:
            # Every checkpoint averages the ranks' BatchNorm running statistics (no --sync-bn): the
            # split run averaged once more, at its stop. Their update is linear, so that changes only
            # the rounding, not the value.
            torch.testing.assert_close(a["nets"][k], b["nets"][k], rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(a["nets"][k], b["nets"][k]), k


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
