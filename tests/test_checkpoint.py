"""Checkpoints that survive kills, full disks, NaNs and bad files: small real states (a tiny net and
its Adam state), real files, real SIGKILLs in forked children."""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess

import pytest
import torch
from torch import nn

from aegan_fast import checkpoint, files
from aegan_fast.checkpoint import (CheckpointWriteError, NonFiniteCheckpoint, config_mismatch, first_nonfinite,
                                   latest_checkpoint, load_checkpoint, load_for_resume,
                                   load_state_strict, save_checkpoint)
from aegan_fast.config import TrainConfig
from aegan_fast.training.run_state import load_sampling_nets
from aegan_fast.errors import UserError
from aegan_fast.models import build_nets
from conftest import tiny_config


def _state(n: int) -> dict:
    """A checkpoint-shaped state whose tensors depend on n: nets, an Adam state after one step, counters."""
    torch.manual_seed(n)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    return {"config": {"n": n}, "nets": net.state_dict(), "opts": {"D_R": opt.state_dict()},
            "counters": {"total_img": n}, "rng": torch.get_rng_state()}


def _assert_is(loaded: dict, n: int) -> None:
    """loaded holds exactly _state(n), rebuilt from its seed (not the object that was saved)."""
    expected = _state(n)
    assert loaded["counters"] == {"total_img": n}
    for k, v in expected["nets"].items():
        assert torch.equal(loaded["nets"][k], v), k
    for i, s in expected["opts"]["D_R"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(loaded["opts"]["D_R"]["state"][i][k], s[k]), (i, k)


def _ckpt(n: int) -> str:
    return f"ckpt-{n:09d}.pt"


def _leftovers(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp"))


def _run_with_two(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, _ckpt(1000), _state(1000))
    save_checkpoint(run, _ckpt(2000), _state(2000))
    return run


# --- a kill at any moment -------------------------------------------------------------------------

def _events(run, n: int) -> list[str]:
    """The fsyncs and renames one save makes, in order (a dry run in a run of its own)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"rename to {os.path.basename(dst)}")
        real_replace(src, dst)

    os.fsync, os.replace = fsync, replace
    try:
        save_checkpoint(run, _ckpt(n), _state(n))
    finally:
        os.fsync, os.replace = real_fsync, real_replace
    return events


def _killed(save) -> None:
    """Run save() in a forked child that SIGKILLs itself where the patches say: no cleanup runs, as
    with a real kill."""
    pid = os.fork()
    if pid == 0:
        try:
            signal.alarm(30)  # a hung child dies of SIGALRM and fails the test instead of hanging it
            save()
        finally:
            os._exit(3)  # only reached when the kill never came
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child status {status}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to SIGKILL a writer mid-save")
def test_sigkill_at_any_moment_leaves_a_loadable_latest(tmp_path):
    dry = _run_with_two(tmp_path / "dry")
    events = _events(dry, 3000)
    assert events == ["fsync file", "rename to ckpt-000003000.pt", "fsync folder",
                      "fsync file", "rename to latest", "fsync folder"]
    committed_at = events.index("rename to latest") + 1
    # kill before each fsync/rename, and in the middle of torch.save writing the file
    for at in [*range(len(events)), "mid-file"]:
        run = _run_with_two(tmp_path / f"kill-{at}")
        new = _state(3000)  # built here: a forked child must not start torch's thread pool (it would hang)

        def save():
            if at == "mid-file":
                def partial(obj, f):
                    f.write(b"PK\x03\x04" + b"\0" * 4096)
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                checkpoint.torch.save = partial
            else:
                calls, real_fsync, real_replace = [0], os.fsync, os.replace

                def hooked(real):
                    def call(*args):
                        if calls[0] == at:
                            os.kill(os.getpid(), signal.SIGKILL)
                        calls[0] += 1
                        return real(*args)
                    return call
                os.fsync, os.replace = hooked(real_fsync), hooked(real_replace)
            save_checkpoint(run, _ckpt(3000), new)

        _killed(save)
        if at == "mid-file":
            assert _leftovers(run), "a kill mid-file leaves its temp file (no cleanup runs)"
        n = 3000 if at != "mid-file" and at >= committed_at else 2000
        assert latest_checkpoint(run).name == _ckpt(n), at
        state, path = load_for_resume(run)
        _assert_is(state, n)
        assert path.name == _ckpt(n)
        # the resumed run's next save commits and clears what the killed writer left behind
        save_checkpoint(run, _ckpt(3000), new)
        _assert_is(load_checkpoint(run), 3000)
        assert _leftovers(run) == [], at


def test_folder_is_fsynced_after_each_rename_and_a_refusing_filesystem_is_tolerated(tmp_path, monkeypatch):
    run = tmp_path / "run"
    log, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            log.append("folder")
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))  # as on filesystems without folder fsync
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (log.append("rename"), real_replace(a, b)))
    save_checkpoint(run, _ckpt(1000), _state(1000))
    assert log == ["rename", "folder", "rename", "folder"]
    _assert_is(load_checkpoint(run), 1000)


# --- write failures raised in the process ---------------------------------------------------------

def _fail_mid_file(obj, f):
    f.write(b"PK\x03\x04" + b"\0" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["mid-file", "rename of the file", "rename of latest", "latest's temp file"])
def test_full_disk_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch, where):
    run = _run_with_two(tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    real_replace, real_mkstemp = os.replace, files.tempfile.mkstemp
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "mid-file":
        monkeypatch.setattr(checkpoint.torch, "save", _fail_mid_file)
    elif where.startswith("rename"):
        target = "latest" if where == "rename of latest" else _ckpt(3000)

        def replace(src, dst):
            if os.path.basename(dst) == target:
                raise full
            real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    else:
        def mkstemp(prefix, **kw):
            if prefix.startswith(".latest"):
                raise full
            return real_mkstemp(prefix=prefix, **kw)
        monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)

    with pytest.raises(CheckpointWriteError) as e:
        save_checkpoint(run, _ckpt(3000), _state(3000))
    message = str(e.value)
    assert "No space left on device" in message and "MB" in message
    assert f"previous checkpoint {run / 'checkpoints' / _ckpt(2000)} is intact" in message
    assert "\n" not in message
    assert isinstance(e.value, UserError)
    # nothing half-written or uncommitted left, and latest still names (and loads) the previous one
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    _assert_is(load_checkpoint(run), 2000)


def test_unwritable_first_checkpoint_says_there_is_none_before(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.torch, "save", _fail_mid_file)
    with pytest.raises(CheckpointWriteError, match=r"could not write .*ckpt-000001000.pt: No space left on device "
                                                   r"\(checkpoint of about 0.0 MB\); no earlier checkpoint exists"):
        save_checkpoint(tmp_path, _ckpt(1000), _state(1000))
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_overwriting_the_current_checkpoint_then_failing_to_commit_names_the_one_before(tmp_path, monkeypatch):
    """Saving the name latest already holds replaces that file before the commit can fail: the intact
    one is then the one before, and the replaced file is not loaded (its digest is the old one's)."""
    run = _run_with_two(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == "latest":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointWriteError, match=f"previous checkpoint .*{_ckpt(1000)} is intact"):
        save_checkpoint(run, _ckpt(2000), _state(2001))
    state, path = load_for_resume(run)
    assert path.name == _ckpt(1000)
    _assert_is(state, 1000)


# --- non-finite values ----------------------------------------------------------------------------

def test_a_nan_deep_in_an_optimizer_state_is_refused_naming_its_path(tmp_path):
    run = _run_with_two(tmp_path)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    bad = _state(3000)
    bad["opts"]["D_R"]["state"][3]["exp_avg"][1] = float("nan")
    with pytest.raises(NonFiniteCheckpoint, match="opts/D_R/state/3/exp_avg holds a NaN or Inf") as e:
        save_checkpoint(run, _ckpt(3000), bad)
    assert e.value.key == "opts/D_R/state/3/exp_avg"
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before  # nothing written


def test_first_nonfinite_walks_nets_lists_and_tuples_and_skips_integer_tensors():
    state = _state(1)
    assert first_nonfinite(state) is None
    state["nets"]["3.bias"][0] = float("-inf")
    state["opts"]["D_R"]["state"][0]["exp_avg_sq"].view(-1)[5] = float("nan")
    assert first_nonfinite(state) == "nets/3.bias"  # the first in the state's own order
    assert first_nonfinite({"a": [1, (torch.zeros(2), torch.tensor([1.0, float("inf")]))]}) == "a/1/1"
    assert first_nonfinite({"rng": torch.full((4,), 255, dtype=torch.uint8), "x": float("nan")}) is None
    assert first_nonfinite({"h": torch.tensor([0.0, float("nan")], dtype=torch.bfloat16)}) == "h"


# --- truncated, corrupt and uncommitted files -----------------------------------------------------

def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def _random(p):
    p.write_bytes(torch.randint(0, 256, (p.stat().st_size,), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0)).numpy().tobytes())


def _flip_middle(p):
    """Inside a tensor's bytes: torch.load reads this without complaint, as other weights."""
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _random, _flip_middle, lambda p: p.unlink()],
                         ids=["truncated", "random bytes", "flipped bytes", "missing"])
def test_a_bad_latest_is_a_clear_error_and_resume_falls_back_saying_so(tmp_path, caplog, damage):
    run = _run_with_two(tmp_path)
    bad, good = run / "checkpoints" / _ckpt(2000), run / "checkpoints" / _ckpt(1000)
    damage(bad)
    if bad.exists():
        with pytest.raises(UserError, match=f"checkpoint {bad} is truncated or corrupt"):
            load_checkpoint(run)
        with pytest.raises(UserError, match=f"checkpoint {bad} is truncated or corrupt"):
            load_checkpoint(bad)  # the file itself, checked against latest's digest too
    with caplog.at_level(logging.WARNING, logger="aegan_fast.checkpoint"):
        state, path = load_for_resume(run)
    assert path == good
    _assert_is(state, 1000)
    assert [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()][0].endswith(f"falling back to {good}")


def test_a_flipped_byte_in_a_tensor_is_caught_by_the_digest_alone(tmp_path):
    """Why latest carries digests: the same flipped file, copied out alone, loads with wrong weights."""
    run = _run_with_two(tmp_path)
    path = run / "checkpoints" / _ckpt(2000)
    data = bytearray(path.read_bytes())
    weight = _state(2000)["nets"]["3.weight"]
    at = bytes(data).index(weight.numpy().tobytes()) + weight.numel() * 2  # in the middle of its bytes
    data[at + 3] ^= 0x40  # one bit of one float's exponent
    path.write_bytes(bytes(data))
    alone = tmp_path / "alone.pt"
    shutil.copy(path, alone)
    loaded = load_checkpoint(alone)
    assert not torch.equal(loaded["nets"]["3.weight"], weight)
    with pytest.raises(UserError, match="sha256 differs"):
        load_checkpoint(run / "checkpoints" / _ckpt(2000))


@pytest.mark.parametrize("damage", [_truncate, _random], ids=["truncated", "random bytes"])
def test_a_bad_file_without_a_digest_is_named_with_torchs_reason(tmp_path, damage):
    """A file copied out of its run (no latest beside it to check it against) is judged by torch.load."""
    alone = tmp_path / "alone.pt"
    torch.save(_state(1), alone)
    damage(alone)
    with pytest.raises(UserError, match=rf"^checkpoint {alone} is truncated or corrupt \(\w+: .*\)$"):
        load_checkpoint(alone)


def test_none_loadable_lists_every_file_tried(tmp_path):
    run = _run_with_two(tmp_path)
    save_checkpoint(run, "stage-ae.pt", _state(2500))
    _truncate(run / "checkpoints" / "stage-ae.pt")
    _random(run / "checkpoints" / _ckpt(2000))
    _flip_middle(run / "checkpoints" / _ckpt(1000))
    with pytest.raises(UserError) as e:
        load_for_resume(run)
    lines = str(e.value).splitlines()
    assert lines[0] == f"no checkpoint of {run} can be loaded; tried:"
    assert [line.split()[1] for line in lines[1:]] == [str(run / "checkpoints" / n)
                                                       for n in ("stage-ae.pt", _ckpt(2000), _ckpt(1000))]
    assert all("truncated or corrupt" in line for line in lines[1:])
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_for_resume(tmp_path / "empty")


def test_a_newer_file_never_committed_is_not_used(tmp_path, caplog):
    run = _run_with_two(tmp_path)
    torch.save(_state(3000), run / "checkpoints" / _ckpt(3000))  # renamed in, then killed before latest
    assert latest_checkpoint(run).name == _ckpt(2000)
    state, path = load_for_resume(run)
    assert path.name == _ckpt(2000)
    _truncate(run / "checkpoints" / _ckpt(2000))
    state, path = load_for_resume(run)  # falls back to the older committed one, not the newer file
    assert path.name == _ckpt(1000)
    _assert_is(state, 1000)


def test_a_pointer_from_before_digests_still_loads(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save(_state(7), folder / "ckpt-000000007.pt")
    (folder / "latest").write_text("ckpt-000000007.pt\n")
    _assert_is(load_checkpoint(tmp_path), 7)
    state, path = load_for_resume(tmp_path)
    _assert_is(state, 7)
    save_checkpoint(tmp_path, "stage-ae.pt", _state(8))  # the resumed run's first save keeps it listed
    _random(folder / "stage-ae.pt")
    state, path = load_for_resume(tmp_path)
    assert path.name == "ckpt-000000007.pt"
    _assert_is(state, 7)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="no sha256sum to check latest's format with")
def test_latest_is_a_sha256sum_file(tmp_path):
    run = _run_with_two(tmp_path)
    out = subprocess.run(["sha256sum", "-c", "latest"], cwd=run / "checkpoints", capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == [_ckpt(2000) + ":", "OK", _ckpt(1000) + ":", "OK"]
    first = (run / "checkpoints" / "latest").read_text().splitlines()[0]
    assert first == hashlib.sha256((run / "checkpoints" / _ckpt(2000)).read_bytes()).hexdigest() + "  " + _ckpt(2000)


# --- keep the last K ------------------------------------------------------------------------------

def test_keep_k_keeps_k_periodic_every_stage_end_and_always_the_current_one(tmp_path):
    folder = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, "stage-ae.pt", _state(0), keep=2)
    for n in range(1, 6):
        save_checkpoint(tmp_path, _ckpt(n), _state(n), keep=2)
    assert sorted(p.name for p in folder.glob("*.pt")) == [_ckpt(4), _ckpt(5), "stage-ae.pt"]
    save_checkpoint(tmp_path, "stage-embed.pt", _state(6), keep=2)  # a stage end takes no periodic slot
    assert sorted(p.name for p in folder.glob("*.pt")) == [_ckpt(4), _ckpt(5), "stage-ae.pt", "stage-embed.pt"]
    # a run gone back to an older count (the divergence guard) saves a smaller name: that one is current
    save_checkpoint(tmp_path, _ckpt(3), _state(3), keep=2)
    assert sorted(p.name for p in folder.glob("*.pt")) == [_ckpt(3), _ckpt(5), "stage-ae.pt", "stage-embed.pt"]
    assert latest_checkpoint(tmp_path).name == _ckpt(3)
    _assert_is(load_checkpoint(tmp_path), 3)
    save_checkpoint(tmp_path, _ckpt(4), _state(4), keep=1)
    assert sorted(p.name for p in folder.glob("*.pt")) == [_ckpt(4), "stage-ae.pt", "stage-embed.pt"]
    listed = [line.split("  ")[1] for line in (folder / "latest").read_text().splitlines()]
    assert listed == [_ckpt(4), "stage-embed.pt", "stage-ae.pt"]  # the fallback order: newest first
    with pytest.raises(ValueError, match="keep must be at least 1"):
        save_checkpoint(tmp_path, _ckpt(9), _state(9), keep=0)


# --- loading into models and configs --------------------------------------------------------------

def _net(width: int, extra: bool = False) -> nn.Module:
    layers = [nn.Conv2d(3, width, 3), nn.BatchNorm2d(width)]
    return nn.Sequential(*layers, nn.Conv2d(width, 2, 1)) if extra else nn.Sequential(*layers)


def test_load_state_strict_names_the_first_mismatch_and_both_shapes():
    with pytest.raises(UserError, match=r"^G_E: the checkpoint's 0.weight is \[16, 3, 3, 3\], this model's "
                                        r"\[8, 3, 3, 3\] \(and 5 more differences\): the checkpoint is from "
                                        r"another configuration or resolution$"):
        load_state_strict(_net(8), _net(16).state_dict(), "G_E")
    with pytest.raises(UserError, match=r"^D_R: this model has 2.weight but the checkpoint does not \(and 1 more"):
        load_state_strict(_net(8, extra=True), _net(8).state_dict(), "D_R")
    with pytest.raises(UserError, match=r"^D_R: the checkpoint has 2.weight, which this model does not \(and 1 more"):
        load_state_strict(_net(8), _net(8, extra=True).state_dict(), "D_R")
    with pytest.raises(UserError, match=r"^D_R: the checkpoint's 0.weight is \[16, 3, 3, 3\], this model's \[8, 3, 3, 3\] "
                                        r"\(and 7 more"):  # a shape says more than a missing key: named first
        load_state_strict(_net(8, extra=True), _net(16).state_dict(), "D_R")
    source = {k: v.clone() for k, v in _net(8).state_dict().items()}
    target = _net(8)
    load_state_strict(target, source, "G_E")
    for k, v in target.state_dict().items():
        assert torch.equal(v, source[k]), k


def test_load_sampling_nets_names_a_net_of_another_resolution(tmp_path):
    cfg = tiny_config()
    other = dataclasses.replace(cfg.model, resolution=128)
    torch.manual_seed(0)
    save_checkpoint(tmp_path, "stage-ae.pt", {"config": cfg.to_dict(), "nets": build_nets(other).state_dict(),
                                              "ema": None})
    with pytest.raises(UserError, match=r"nets of .*: .*is \[.*\], this model's \[.*\].*another configuration "
                                        r"or resolution"):
        load_sampling_nets(tmp_path)
    save_checkpoint(tmp_path, "stage-embed.pt", {"config": {"x": 1}})
    with pytest.raises(UserError, match="not an aegan_fast training checkpoint"):
        load_sampling_nets(tmp_path)


def test_config_mismatch_names_nested_fields_by_dotted_name():
    saved = tiny_config().to_dict()
    now = tiny_config(device="cuda", batch=8, kimg={"ae": 0.016, "embed": 0.032, "finetune": 0.016}).to_dict()
    now["model"]["resolution"] = 128
    now["betas"] = list(now["betas"])  # a tuple read back as a list is the same setting
    assert config_mismatch(saved, now, ignore=("device",)) == [
        "batch: checkpoint 4, now 8", "kimg.embed: checkpoint 0.016, now 0.032",
        "model.resolution: checkpoint 64, now 128"]
    assert config_mismatch(saved, now, ignore=("device", "model", "kimg", "batch")) == []
    del now["seed"]
    assert "seed: checkpoint 0, now (not set)" in config_mismatch(saved, now)
    assert config_mismatch(TrainConfig().to_dict(), TrainConfig().to_dict()) == []


# --------------------------------------------------------------------------- in the trainer

def test_a_full_disk_during_training_stops_with_a_clear_error_and_the_run_resumes(tmp_path, image_folder,
                                                                                  monkeypatch):
    """The trainer's third checkpoint hits ENOSPC mid-file: the run stops with a CheckpointWriteError
    naming the intact previous checkpoint, which --resume then continues to the end."""
    from aegan_fast.data import load_folder
    from aegan_fast.training import train
    run = tmp_path / "run"
    run.mkdir()
    data, cfg = load_folder(image_folder, 64), tiny_config()
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*previous checkpoint .*stage-ae.pt.* intact"):
        train(cfg, run, progress=False, data=data)
    assert load_checkpoint(run)["counters"]["stage"] == "embed"
    assert not list((run / "checkpoints").glob(".*"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    train(cfg, run, resume=True, progress=False, data=data)
    assert load_checkpoint(run)["counters"] == {"stage": "done", "stage_img": 0, "stage_s": 0.0, "total_img": 48, "step": 12}


def test_resume_refuses_a_checkpoint_of_another_resolution(tmp_path, image_folder):
    """A stage-end checkpoint of an R=64 run copied under a run whose config says R=128: restore names
    the first mismatching setting with both values."""
    from aegan_fast.data import load_folder
    from aegan_fast.training import new_state, restore
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(kimg={"ae": 0.004, "embed": 0.0, "finetune": 0.0})
    from aegan_fast.training import train
    train(cfg, run, progress=False, data=load_folder(image_folder, 64))
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, resolution=128))
    st = new_state(other, load_folder(image_folder, 128), torch.device("cpu"))
    with pytest.raises(UserError, match="model.resolution: checkpoint 64, now 128"):
        restore(st, load_checkpoint(run))
