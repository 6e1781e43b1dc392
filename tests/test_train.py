"""The trainer end to end on tiny nets: artifacts, checkpoints, resume mid-stage, and the CLIs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from aegan_fast.checkpoint import atomic_write_bytes, load_checkpoint, load_sampling_nets
from aegan_fast.data import load_folder
from aegan_fast.models import SamplingChain
from aegan_fast.train import main as train_main
from aegan_fast.train import train
from aegan_fast.sample import main as sample_main
from conftest import tiny_config


def test_full_run_writes_every_artifact(tmp_path, image_folder):
    run = tmp_path / "run"
    run.mkdir()
    train(tiny_config(), run, progress=False, data=load_folder(image_folder, 64))
    assert json.loads((run / "config.json").read_text())["model"]["resolution"] == 64
    assert (run / "losses.png").stat().st_size > 1000
    for stage in ("ae", "embed", "finetune"):
        assert (run / "samples" / f"{stage}-final.png").exists()
        assert (run / "checkpoints" / f"stage-{stage}.pt").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "losses" in r]
    assert {r["stage"] for r in steps} == {"ae", "embed", "finetune"}
    assert all(r["img_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in steps)
    evals = {r["stage"]: r["eval"] for r in rows if "eval" in r}
    assert 0 < evals["ae"]["l1"] < 2 and 0 < evals["ae"]["psnr"] < 60
    for stage in ("embed", "finetune"):
        assert evals[stage]["swd"] > 0 and 0 <= evals[stage]["msssim"] <= 1
    state = load_checkpoint(run)
    assert state["counters"]["stage"] == "done" and state["counters"]["total_img"] == 3 * 16
    assert state["ema"] is not None
    assert not list(run.rglob("*.tmp"))
    assert len(list((run / "checkpoints").glob("ckpt-*.pt"))) <= 3  # older periodic ones pruned
    assert (run / "checkpoints" / "stage-ae.pt").stat().st_mode & 0o044  # readable like any file


def test_checkpoint_round_trip(tmp_path, image_folder):
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config()
    train(cfg, run, progress=False, data=load_folder(image_folder, 64), stop_after_steps=2)
    state = load_checkpoint(run)
    from aegan_fast.models import build_nets
    nets = build_nets(cfg.model)
    nets.load_state_dict(state["nets"])
    for k, v in nets.state_dict().items():
        torch.testing.assert_close(v, state["nets"][k], rtol=0, atol=0)
    assert state["counters"] == {"stage": "ae", "stage_img": 8, "total_img": 8, "step": 2}
    assert set(state["opts"]) == {"H", "F", "G_E", "D_E", "phi", "D_R"}


@pytest.mark.parametrize("stop_at", [2, 6, 10])  # inside stage 1, 2 and 3 (4 steps a stage)
def test_resume_mid_stage_matches_an_uninterrupted_run(tmp_path, image_folder, stop_at):
    data = load_folder(image_folder, 64)
    cfg = tiny_config()
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    train(cfg, straight, progress=False, data=data)

    train(cfg, split, progress=False, data=data, stop_after_steps=stop_at)
    mid = load_checkpoint(split)["counters"]
    assert mid["step"] == stop_at and mid["stage"] == ("ae", "embed", "finetune")[stop_at // 4]
    train(cfg, split, resume=True, progress=False, data=data)

    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["counters"] == b["counters"]
    for k in a["nets"]:  # same data order, same z, same dropout masks: the same weights
        torch.testing.assert_close(a["nets"][k], b["nets"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(target, boom)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def _cli(args, **env):
    """Run a CLI in a subprocess: what a user sees, exit code and all."""
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=e, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/folder"], "does not exist"),
    (["--resolution", "100"], "power of two"),
    (["--resolution", "32"], "power of two"),
    (["--batch", "1"], "--batch must be"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
])
def test_train_cli_bad_input(args, message, tmp_path):
    r = _cli(["aegan_fast.train", "--outdir", str(tmp_path), *args])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing half-made left behind


def test_train_cli_empty_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(SystemExit) as e:
        train_main(["--data", str(empty), "--outdir", str(tmp_path / "runs")])
    assert e.value.code == 2 and "no images" in capsys.readouterr().err


def test_unreadable_files_are_skipped_and_counted(tmp_path, image_folder):
    (image_folder / "broken.png").write_bytes(b"\x89PNG not really")
    (image_folder / "empty.jpg").write_bytes(b"")
    data = load_folder(image_folder, 64)
    assert len(data) == 12 and data.skipped == 2


def test_npm_missing_is_a_clear_error(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    r = _cli(["aegan_fast.train", "--outdir", str(tmp_path / "runs")], PATH=str(bare),
             AEGAN_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 2 and "needs npm" in r.stderr and "Traceback" not in r.stderr


def test_cli_train_resume_and_sample(tmp_path, image_folder):
    run = tmp_path / "run"
    args = ["--data", str(image_folder), "--run-dir", str(run), "--batch", "4", "--kimg-ae", "0.008",
            "--kimg-embed", "0.008", "--kimg-finetune", "0.008", "--no-progress", "--device", "cpu"]
    r = _cli(["aegan_fast.train", *args])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done in" in r.stdout and str(run) in r.stdout
    r = _cli(["aegan_fast.train", *args])  # the same run dir again: refused, not overwritten
    assert r.returncode == 2 and "--resume" in r.stderr

    with pytest.raises(SystemExit) as e:
        sample_main(["--ckpt", str(run), "--n", "5", "--out", str(tmp_path / "grid.jpg")])
    assert e.value.code == 2
    sample_main(["--ckpt", str(run), "--n", "5", "--seed", "3", "--out", str(tmp_path / "grid.png")])
    sample_main(["--ckpt", str(run), "--n", "3", "--out", str(tmp_path / "imgs") + "/"])
    assert (tmp_path / "grid.png").exists()
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 3


def test_no_denoiser_ablation_trains_and_samples_f_of_g_e(tmp_path, image_folder):
    run = tmp_path / "run"
    r = _cli(["aegan_fast.train", "--data", str(image_folder), "--run-dir", str(run), "--batch", "4",
              "--kimg-ae", "0.008", "--kimg-embed", "0.008", "--kimg-finetune", "0.008", "--no-progress",
              "--device", "cpu", "--no-denoiser"])
    assert r.returncode == 0, r.stderr[-2000:]
    state = load_checkpoint(run)
    assert state["config"]["model"]["denoiser"] is False
    assert not any(k.startswith("phi.") for k in state["nets"]) and "phi" not in state["opts"]
    cfg, nets = load_sampling_nets(run)
    z = torch.rand(3, cfg.model.z_dim) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(SamplingChain.of(nets)(z), nets["F"](nets["G_E"](z)), rtol=0, atol=0)
    sample_main(["--ckpt", str(run), "--n", "4", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").stat().st_size > 100


def test_doctor_reports_backends():
    r = _cli(["aegan_fast.doctor"])
    assert r.returncode == 0
    assert "reference" in r.stdout and "cpp" in r.stdout and "onnxruntime" in r.stdout


def test_periodic_checkpoints_are_pruned(tmp_path):
    from aegan_fast.checkpoint import save_checkpoint
    save_checkpoint(tmp_path, "stage-ae.pt", {"n": 0})
    for n in range(1, 6):
        save_checkpoint(tmp_path, f"ckpt-{n * 1000:09d}.pt", {"n": n})
    left = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert left == ["ckpt-000003000.pt", "ckpt-000004000.pt", "ckpt-000005000.pt", "stage-ae.pt"]
    assert load_checkpoint(tmp_path)["n"] == 5
