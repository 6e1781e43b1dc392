"""Two torchrun agents on one host, as two nodes would run (``--nnodes=2 --nproc_per_node=1``, c10d
rendezvous on 127.0.0.1): a run through every stage and its exact resume, rank 0's files and no
one else's, a node lost mid-run (with and without an elastic ``--nnodes=1:2``), and the errors of a
job that cannot start (a node that never joins, a run directory that is not one shared folder, a
batch the processes do not divide). Every wait is bounded: each collective by a short
``--collective-timeout-s``, each test's processes by a deadline, and every process a test starts
(agents and their workers, which torchrun puts in sessions of their own) is killed at its end."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from aegan_fast.checkpoint import LATEST, load_checkpoint
from conftest import make_image_folder
from test_distributed import TINY, TORCHRUN, _expected_images, _steps, _wait_for, _workers

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="this torch has no gloo backend")]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20  # --collective-timeout-s of these runs: a lost peer must stop the others well within a test
KIMG = (0.016, 0.4, 0.016)  # stage 2 long enough to stop or kill it in the middle
# Rank 1's writes, seen by an audit hook (sys.addaudithook) installed before anything else runs in it
AUDIT = '''
import os, sys
if os.environ.get("RANK", "0") != "0" and os.environ.get("AUDIT_DIR"):
    _log = open(os.path.join(os.environ["AUDIT_DIR"], f"rank{os.environ['RANK']}-{os.getpid()}.log"), "a", buffering=1)
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.truncate"):
            path, writes = args[0], True
        else:
            return
        if writes and not isinstance(path, int):
            _log.write(f"{event} {os.path.abspath(os.fsdecode(os.fspath(path)))}\\n")
    sys.addaudithook(_hook)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(images, run, kimg=KIMG, batch=8):
    return ["--data", str(images), "--run-dir", str(run), "--batch", str(batch),
            "--kimg", *[f"{s}={k}" for s, k in zip(("ae", "embed", "finetune"), kimg)],
            "--ckpt-every-kimg", "0.016", "--sample-every-kimg", "0.2", "--log-every-steps", "1", "--sync-bn",
            *TINY, "--collective-timeout-s", str(TIMEOUT_S)]


class Job:
    """Torchrun agents started one after the other (the first hosts the c10d store), each with its
    own working directory and output files; ``close`` kills whatever is left of them and of their
    workers."""

    def __init__(self, tmp: Path, name: str, train_args, nodes=2, nnodes="2", cwds=None, extra=(), env=None):
        self.port, self.tmp, self.name = _free_port(), tmp, name
        self.agents, self.workers, self.out = [], set(), []
        cwds = cwds or [tmp] * nodes
        e = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), str(tmp / "audit_site")]),
                 **(env or {}))
        (tmp / "audit_site").mkdir(exist_ok=True)
        (tmp / "audit_site" / "sitecustomize.py").write_text(AUDIT)
        for i in range(nodes):
            cmd = [str(TORCHRUN), f"--nnodes={nnodes}", "--nproc_per_node=1", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{self.port}", f"--rdzv-id={name}", *extra, "-m", "aegan_fast.train",
                   *(train_args[i] if isinstance(train_args, tuple) else train_args)]
            out = (open(tmp / f"{name}.{i}.out", "w"), open(tmp / f"{name}.{i}.err", "w"))
            self.out.append(out)
            self.agents.append(subprocess.Popen(cmd, cwd=cwds[i], stdout=out[0], stderr=out[1], text=True, env=e,
                                                start_new_session=True))
            if i == 0:
                _wait_for(lambda: self._listening(), timeout=60, what="the first agent's rendezvous store")

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def note_workers(self) -> dict[int, tuple[int, int]]:
        """{rank: (node, worker pid)}, remembered for close()."""
        ranks = {}
        for node, agent in enumerate(self.agents):
            for rank, pid in _workers(agent.pid).items():
                ranks[rank] = (node, pid)
                self.workers.add(pid)
        return ranks

    def wait(self, timeout=300) -> list[int]:
        deadline = time.monotonic() + timeout
        for a in self.agents:
            a.wait(timeout=max(1.0, deadline - time.monotonic()))
        return [a.returncode for a in self.agents]

    def err(self, node: int) -> str:
        return (self.tmp / f"{self.name}.{node}.err").read_text()

    def kill_node(self, node: int) -> None:
        """SIGKILL to the agent and its workers at once: the node is gone."""
        pids = [self.agents[node].pid, *_workers(self.agents[node].pid).values()]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        for agent in self.agents:
            self.workers.update(_workers(agent.pid).values())
        for pid in [*self.workers, *(a.pid for a in self.agents if a.poll() is None)]:
            try:
                os.killpg(pid, signal.SIGKILL)  # workers and agents each lead a session of their own
            except (ProcessLookupError, PermissionError):
                pass
        for a in self.agents:
            try:
                a.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for files in self.out:
            for f in files:
                f.close()


def _run_job(tmp, name, train_args, timeout=300, **kw) -> Job:
    job = Job(tmp, name, train_args, **kw)
    try:
        job.wait(timeout)
    finally:
        job.close()
    return job


def _tensors(obj, prefix=""):
    """{path: tensor} of every tensor in a nested state."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}.{k}"))
    return out


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _checkpoints_whole(run: Path) -> list[str]:
    """The committed checkpoints, each checked against the sha256 the manifest holds."""
    folder = run / "checkpoints"
    names = []
    for line in (folder / LATEST).read_text().splitlines():
        digest, name = line.split("  ", 1)
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
        names.append(name)
    load_checkpoint(run)
    return names


def _worker_tracebacks(err: str) -> list[str]:
    return [line for line in err.splitlines() if "aegan_fast" in line and 'File "' in line]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    images = make_image_folder(root / "images")
    cache = root / "cache"
    return root, images, {"AEGAN_CACHE": str(cache), "AUDIT_DIR": str(root)}


@pytest.fixture(scope="module")
def straight(setting):
    """An uninterrupted two-agent run through all three stages, each agent in a working directory
    of its own (rank 1's writes audited)."""
    root, images, env = setting
    cwds = [root / "cwd0", root / "cwd1"]
    for c in cwds:
        c.mkdir()
    run = root / "straight"
    job = _run_job(root, "straight", _args(images, run), cwds=cwds, env=env)
    return run, job, cwds


def test_two_agents_train_all_three_stages_and_record_two_processes(straight):
    run, job, _ = straight
    assert [a.returncode for a in job.agents] == [0, 0], job.err(0)[-3000:] + job.err(1)[-3000:]
    state = load_checkpoint(run)
    assert state["counters"]["stage"] == "done"
    assert state["counters"]["total_img"] == _expected_images(KIMG, 8)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert "2 processes (gloo), global batch 8 = 4 per process" in job.err(0) + job.err(1)


def test_only_rank_0_writes_in_the_run_directory_and_nobody_in_their_working_directory(straight, setting):
    run, job, cwds = straight
    root = setting[0]
    assert [a.returncode for a in job.agents] == [0, 0]
    assert [list(c.iterdir()) for c in cwds] == [[], []]
    logs = list(root.glob("rank1-*.log"))
    assert logs, "the audit hook did not run in rank 1"
    written = [line for log in logs for line in log.read_text().splitlines()]
    assert not [w for w in written if str(run) in w or any(str(c) in w for c in cwds)], written
    assert not list(root.glob("rank0-*.log"))  # the hook audits rank 1 only: rank 0 is the writer
    # and what rank 0 wrote is the run's files, nothing else (no token file left behind)
    names = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    expected = {"config.json", "metrics.jsonl", "losses.png", "checkpoints/latest", "checkpoints/sampling",
                "samples/ae-final.png", "samples/embed-final.png", "samples/finetune-final.png"}
    assert expected <= names
    assert all(n in expected or n.startswith(("checkpoints/ckpt-", "checkpoints/stage-", "samples/embed-",
                                              "tensorboard/")) for n in names), names


def test_a_two_agent_resume_after_a_stop_in_stage_2_ends_bit_identical(straight, setting, tmp_path):
    run_a = straight[0]
    _, images, env = setting
    run = tmp_path / "split"
    job = Job(tmp_path, "first", _args(images, run), env=env)
    try:
        _wait_for(lambda: any(r["stage"] == "embed" and r["stage_kimg"] >= 0.08 for r in _steps(run)), timeout=240,
                  what="stage 2")
        for agent in job.agents:  # what a scheduler does to a job on two nodes
            agent.send_signal(signal.SIGTERM)
        codes = job.wait(120)
    finally:
        job.close()
    assert all(c != 0 for c in codes), codes
    stopped = load_checkpoint(run)["counters"]
    assert stopped["stage"] == "embed" and 0 < stopped["stage_img"] < 400, stopped

    resumed = _run_job(tmp_path, "resumed", ["--resume", str(run), "--no-progress", "--collective-timeout-s",
                                              str(TIMEOUT_S)], env=env)
    assert [a.returncode for a in resumed.agents] == [0, 0], resumed.err(0)[-3000:] + resumed.err(1)[-3000:]
    a, b = load_checkpoint(run_a), load_checkpoint(run)
    assert a["counters"] == b["counters"] and b["world_size"] == 2
    for part in ("nets", "ema", "opts"):
        ta, tb = _tensors(a[part], part), _tensors(b[part], part)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k


def _until_stage_2_checkpoint(run):
    _wait_for(lambda: any(r["stage"] == "embed" and r["stage_kimg"] >= 0.048 for r in _steps(run)), timeout=240,
              what="a periodic checkpoint in stage 2")


def test_a_lost_node_stops_the_other_in_one_line_and_the_same_command_resumes(setting, tmp_path):
    _, images, env = setting
    run = tmp_path / "run"
    job = Job(tmp_path, "lost", _args(images, run), env=env)
    try:
        _until_stage_2_checkpoint(run)
        ranks = job.note_workers()
        lost, survivor = ranks[1][0], ranks[0][0]
        job.kill_node(lost)
        t0 = time.monotonic()
        job.agents[survivor].wait(timeout=TIMEOUT_S + 30)
        stopped_s = time.monotonic() - t0
    finally:
        job.close()
    assert stopped_s < TIMEOUT_S + 15 and job.agents[survivor].returncode != 0
    err = job.err(survivor)
    lines = [line for line in err.splitlines() if "lost contact" in line]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 lost contact with the other processes during "
                                                   "training"), err[-3000:]
    assert f"--resume {run}" in lines[0]
    assert not _worker_tracebacks(err), err[-3000:]  # torchrun's own report of the failed worker is all else
    names = _checkpoints_whole(run)
    assert load_checkpoint(run)["counters"]["stage"] == "embed" and names

    resumed = _run_job(tmp_path, "again", ["--resume", str(run), "--no-progress", "--collective-timeout-s",
                                            str(TIMEOUT_S)], env=env)
    assert [a.returncode for a in resumed.agents] == [0, 0], resumed.err(0)[-3000:]
    final = load_checkpoint(run)
    assert final["counters"]["stage"] == "done" and final["counters"]["total_img"] == _expected_images(KIMG, 8)


def test_elastic_nnodes_1_2_continues_on_the_surviving_node_with_the_same_global_batch(setting, tmp_path):
    _, images, env = setting
    run = tmp_path / "run"
    # last_call: how long a rendezvous waits for more nodes once it has enough (both nodes at the start)
    job = Job(tmp_path, "elastic", _args(images, run), nnodes="1:2", env=env,
              extra=("--max-restarts=1", "--rdzv-conf=last_call_timeout=10,join_timeout=60"))
    try:
        _until_stage_2_checkpoint(run)
        before = load_checkpoint(run)
        ranks = job.note_workers()
        lost, survivor = ranks[1][0], ranks[0][0]
        job.kill_node(lost)
        job.agents[survivor].wait(timeout=240)
    finally:
        job.close()
    err = job.err(survivor)
    assert job.agents[survivor].returncode == 0, err[-3000:]
    assert before["world_size"] == 2 and before["counters"]["stage"] == "embed"
    assert "elastic restart 1: continuing" in err
    assert "the run trained on 2 processes and continues on 1: the same global batch 8, now 8 per process" in err
    final = load_checkpoint(run)
    assert final["world_size"] == 1 and final["counters"]["stage"] == "done"
    assert final["counters"]["total_img"] == _expected_images(KIMG, 8)


# --------------------------------------------------------------------------- jobs that cannot start

def test_a_node_whose_processes_never_join_fails_the_others_in_one_line(straight, tmp_path, setting):
    """Node 2 is started with --resume of a folder it does not have: its rank fails before joining,
    and the other, bounded by the join timeout (here the collective timeout), says what happened."""
    env = setting[2]
    cwds = [tmp_path / "a", tmp_path / "b"]
    for c in cwds:
        c.mkdir()
    shutil.copytree(straight[0], cwds[0] / "run")
    t0 = time.monotonic()
    job = _run_job(tmp_path, "nojoin", ["--resume", "run", "--no-progress", "--collective-timeout-s", "8"],
                   cwds=cwds, env=env, timeout=120)
    assert time.monotonic() - t0 < 90
    first, second = job.err(0), job.err(1)
    assert "error: " in second and not _worker_tracebacks(second), second[-2000:]
    lines = [line for line in first.splitlines() if "processes started within" in line]
    assert len(lines) == 1 and lines[0].startswith("error: rank "), first[-3000:]
    assert "only 1 of the job's 2 processes started within 8 s: a node never started its torchrun" in lines[0]
    assert not _worker_tracebacks(first), first[-3000:]


def test_torchruns_own_wait_for_a_node_that_never_starts_is_bounded(tmp_path, setting):
    _, images, env = setting
    run = tmp_path / "run"
    t0 = time.monotonic()
    job = _run_job(tmp_path, "alone", _args(images, run), nodes=1, env=env, timeout=120,
                   extra=("--rdzv-conf=join_timeout=5",))
    assert job.agents[0].returncode != 0 and time.monotonic() - t0 < 90
    assert "RendezvousTimeoutError" in job.err(0)
    assert not run.exists()  # no worker ever started


def test_a_run_directory_that_is_not_shared_stops_every_rank_before_anything_is_written(straight, tmp_path, setting):
    """Node 2 sees its own copy of the run (a local folder where a shared mount should be): the
    token rank 0 writes is not there, every rank exits 2, and neither folder changes."""
    env = setting[2]
    cwds = [tmp_path / "a", tmp_path / "b"]
    for c in cwds:
        c.mkdir()
        shutil.copytree(straight[0], c / "run")
    before = [_tree(c / "run") for c in cwds]
    job = _run_job(tmp_path, "unshared", ["--resume", "run", "--no-progress", "--collective-timeout-s", "20"],
                   cwds=cwds, env=env, timeout=180)
    assert [a.returncode for a in job.agents] != [0, 0]
    for node in (0, 1):
        err = job.err(node)
        lines = [line for line in err.splitlines() if "is not the same folder on every node" in line]
        assert len(lines) == 1 and lines[0].startswith("error: the run directory run is not the same folder"), err
        assert "rank 1 on " in lines[0] and not _worker_tracebacks(err)
        assert "exitcode  : 2" in err  # torchrun's report of its worker's exit status
    assert [_tree(c / "run") for c in cwds] == before


def test_a_batch_the_processes_do_not_divide_is_one_line_on_every_rank(tmp_path, setting):
    _, images, env = setting
    run = tmp_path / "run"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "aegan_fast.train",
           *_args(images, run, batch=9)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(REPO), **env))
    assert r.returncode != 0
    # Counted, not split into lines: the two ranks share one stderr, and their lines can land interleaved
    # (one rank's message before the other's newline).
    message = "error: --batch 9 is the global batch and must divide by the 2 processes (e.g. --batch 8)"
    assert r.stderr.count(message) == 2, r.stderr[-3000:]
    assert "exitcode  : 2" in r.stderr and not _worker_tracebacks(r.stderr)
    assert not run.exists()
