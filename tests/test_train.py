"""The trainer end to end on tiny nets: artifacts, checkpoints and the CLIs (resume and signals:
test_resume.py)."""
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from aegan_fast.training import stages
from aegan_fast.config import preset
from aegan_fast.checkpoint import atomic_write_bytes, load_checkpoint, resolve_checkpoint
from aegan_fast.training.run_state import load_sampling_nets
from aegan_fast.data import load_folder, make_loader
from aegan_fast.metrics import msssim_diversity, swd
from aegan_fast.models import SamplingChain, build_nets, sample_z
from aegan_fast.train import main as train_main
from aegan_fast.training import new_state, restore, save_run, train
from aegan_fast.sample import main as sample_main
from conftest import tiny_config


def _stage_nets(run, stage: str, cfg):
    """Nets built from the seed-independent model config and loaded from checkpoints/stage-<stage>.pt
    by hand: its live nets, with its EMA's over them (what the sampling chain's figures judge)."""
    state = torch.load(run / "checkpoints" / f"stage-{stage}.pt", weights_only=True)
    nets = build_nets(cfg.model)
    nets.load_state_dict(state["nets"])
    for name, sd in (state["ema"] or {}).items():
        nets[name].load_state_dict(sd)
    return nets.eval(), state


def test_full_run_writes_every_artifact(tiny_run):
    run, images = tiny_run
    cfg = tiny_config()
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

    # The stage-end figures, recomputed from the stage's checkpoint: 12 images, none held out (fewer
    # than 100), so the reference is all of them, in order (eval_n = 16 asks for more than there are).
    real = load_folder(images, 64).images.float() / 127.5 - 1
    assert len(real) == 12 and cfg.eval_n > 12
    nets, state = _stage_nets(run, "ae", cfg)
    assert state["ema"] is None  # the autoencoder's own H and F, as trained
    with torch.no_grad():
        recon = nets["F"](nets["H"](real)).double()
    mse = (recon - real.double()).pow(2).mean(dim=(1, 2, 3))
    assert set(evals["ae"]) == {"l1", "psnr"}
    assert evals["ae"]["l1"] == pytest.approx((recon - real.double()).abs().mean().item(), rel=1e-5)
    assert evals["ae"]["psnr"] == pytest.approx((10 * torch.log10(4 / mse)).mean().item(), abs=1e-4)  # [-1, 1]: range 2
    for stage in ("embed", "finetune"):
        nets, state = _stage_nets(run, stage, cfg)
        assert set(state["ema"]) == {"G_E", "F", "phi"}  # the chain's figures are its EMA's
        fake = SamplingChain.of(nets).sample(12, seed=cfg.seed)
        want = {**swd(real, fake, seed=cfg.seed), "msssim": msssim_diversity(fake, seed=cfg.seed)}
        assert evals[stage] == pytest.approx(want, rel=1e-5), stage

    state = load_checkpoint(run)
    assert state["counters"]["stage"] == "done" and state["counters"]["total_img"] == 3 * 16
    assert state["ema"] is not None
    assert not list(run.rglob("*.tmp"))
    assert len(list((run / "checkpoints").glob("ckpt-*.pt"))) <= 3  # older periodic ones pruned
    assert (run / "checkpoints" / "stage-ae.pt").stat().st_mode & 0o044  # readable like any file


def _tensors(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def test_checkpoint_round_trip(tmp_path, image_folder):
    """One real step, saved; loaded into fresh nets from another seed, which held other weights
    before: afterwards they hold the trained weights, Adam moments and counters captured by clone
    before the save."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config()
    data = load_folder(image_folder, 64)
    st = new_state(cfg, data, torch.device("cpu"))
    loader = make_loader("torch", data, cfg.batch, cfg.seed, "cpu")
    stages.run_stage(stages.AE, st, loader, until_img=cfg.batch)
    trained = _tensors(st.nets.state_dict())
    moments = {k: _tensors(v) for k, v in st.opts["H"].state_dict()["state"].items()}
    save_run(st, run, loader)
    loader.close()

    fresh = new_state(dataclasses.replace(cfg, seed=cfg.seed + 1), data, torch.device("cpu"))
    fresh.cfg = cfg
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.nets.state_dict().items())
    restore(fresh, load_checkpoint(run))
    for k, v in fresh.nets.state_dict().items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0, msg=k)
    loaded = fresh.opts["H"].state_dict()["state"]
    assert moments and set(loaded) == set(moments)
    for i in moments:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(loaded[i][k], moments[i][k], rtol=0, atol=0)
    assert fresh.counters == {"stage": "ae", "stage_img": 4, "stage_s": st.counters["stage_s"], "total_img": 4,
                              "step": 1} and st.counters["stage_s"] > 0
    assert set(load_checkpoint(run)["opts"]) == {"H", "F", "G_E", "D_E", "phi", "D_R"}


def test_ema_off_keeps_no_ema(tmp_path, image_folder):
    run = tmp_path / "run"
    run.mkdir()
    train(tiny_config(ema_kimg=0.0, kimg={"ae": 0.004, "embed": 0.004, "finetune": 0.004}), run,
          progress=False, data=load_folder(image_folder, 64))
    state = load_checkpoint(run)
    assert state["counters"]["stage"] == "done" and state["ema"] is None
    # the stage-end checkpoint sampling uses (checkpoints/sampling: the better chain by SWD)
    sampled = load_checkpoint(resolve_checkpoint(run))
    assert sampled["ema"] is None
    _, nets = load_sampling_nets(run)  # the sampler then reads the live nets
    for k, v in nets["G_E"].state_dict().items():
        assert torch.equal(v, sampled["nets"][f"G_E.{k}"])


def test_sampler_reads_the_ema_weights(tiny_run):
    run, _ = tiny_run
    state = torch.load(resolve_checkpoint(run), weights_only=True)  # the stage the run samples from
    _, nets = load_sampling_nets(run)
    for net in ("G_E", "F", "phi"):
        for k, v in nets[net].state_dict().items():
            assert torch.equal(v, state["ema"][net][k]), (net, k)
    assert any(not torch.equal(v, state["nets"][f"G_E.{k}"]) for k, v in state["ema"]["G_E"].items())


def test_a_stage_ends_at_its_minutes_budget(tmp_path, image_folder, monkeypatch):
    """--minutes ends a stage when its training steps have taken that long (a clock that advances one
    second per reading: each step reads it three times, so two seconds a step), whichever of kimg and
    minutes comes first; the stage's end row says what it got, and the next stage starts from zero."""
    import aegan_fast.training.stages as stages_mod
    clock = iter(range(10 ** 9))
    monkeypatch.setattr(stages_mod.time, "perf_counter", lambda: float(next(clock)))
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(stages=("ae", "direct"), kimg={"ae": 0.04, "direct": 0.008}, minutes={"ae": 5 / 60},
                      eval_metrics=(), sample_every_kimg=0.0, ckpt_every_kimg=0.0)
    train(cfg, run, progress=False, data=load_folder(image_folder, 64))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ends = {r["stage"]: r["stage_end"] for r in rows if "stage_end" in r}
    assert ends["ae"]["kimg"] == 0.012  # 3 steps of 4 images: 2 s, 4 s, 6 s ≥ 5 s (the 10 steps of 0.04 kimg cut short)
    assert ends["direct"]["kimg"] == 0.008 and ends["direct"]["minutes"] == 2 * 2 / 60  # no limit: kimg ends it
    assert ends["ae"]["minutes"] == 6 / 60


def test_stage_1_rate_decays_in_the_loop(tmp_path, image_folder):
    """The trainer sets the decayed rate before each stage-1 step: 4 steps of a 16-image stage, the
    last one at progress 12/16, so F's rate there is 0.1 + 0.9·(1 + cos(0.75π))/2 of its own."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(stages=("ae",), kimg={"ae": 0.016}, ae_lr_final=0.1, eval_metrics=())
    train(cfg, run, progress=False, data=load_folder(image_folder, 64))
    state = torch.load(run / "checkpoints" / "stage-ae.pt", weights_only=True)
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75))
    assert state["opts"]["F"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr["F"] * factor)


def test_direct_stage_trains_in_the_same_loop(tmp_path, image_folder):
    """The baseline GAN is a stage record: the trainer's seeding, EMA and checkpoint format."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(stages=("direct",), kimg={"direct": 0.008}, eval_metrics=())
    train(cfg, run, progress=False, data=load_folder(image_folder, 64))
    state = load_checkpoint(run)
    assert state["counters"] == {"stage": "done", "stage_img": 0, "stage_s": 0.0, "total_img": 8, "step": 2}
    assert list(state["config"]["stages"]) == ["direct"] and state["ema"] is not None
    assert (run / "checkpoints" / "stage-direct.pt").exists() and (run / "samples" / "direct-final.png").exists()
    torch.manual_seed(cfg.seed)
    fresh = build_nets(cfg.model)
    for k, v in fresh.state_dict().items():  # H and D_E took no part: still as built from the seed
        if k.startswith(("H.", "D_E.")):
            assert torch.equal(v, state["nets"][k]), k
    moved = {k.split(".")[0] for k, v in fresh.state_dict().items() if not torch.equal(v, state["nets"][k])}
    assert moved == {"G_E", "F", "phi", "D_R"}  # the chain and its judge
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {k for r in rows if "losses" in r for k in r["losses"]} == {"D_R", "G_adv"}


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


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/folder"], "does not exist"),
    (["--resolution", "100"], "power of two"),
    (["--resolution", "32"], "power of two"),
    (["--batch", "1"], "--batch must be"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
    (["--kimg-ae", "-1"], "--kimg ae must be ≥ 0"),
    (["--kimg", "embed=-2"], "--kimg embed must be ≥ 0"),
    (["--stages", "ae", "nope"], "unknown stage 'nope'"),
    (["--stages", "direct"], "no length for stage 'direct'"),
    (["--loss", "wasserstein"], "--loss must be one of"),
])
def test_train_cli_bad_input(args, message, tmp_path, capsys):
    """What a user sees: exit 2, one line naming the problem, nothing half-made left behind (the real
    entry point's exit code and stderr: test_cli_train_resume_and_sample)."""
    with pytest.raises(SystemExit) as e:
        train_main(["--outdir", str(tmp_path), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--kimg", "ae=0", "embed=0", "finetune=0"], "every stage has length 0"),
    (["--kimg", "ae=nan"], "--kimg ae must be ≥ 0"),
    (["--stages", "ae", "ae"], "each stage once"),
    (["--embed-steps", "0"], "--embed-steps must be > 0"),
    (["--log-every-steps", "-3"], "--log-every-steps must be > 0"),
    (["--ckpt-every-kimg", "-1"], "--ckpt-every-kimg must be ≥ 0"),
    (["--ckpt-keep", "0"], "--ckpt-keep must be > 0"),
    (["--grid-size", "0"], "--grid-size must be > 0"),
    (["--lr", "G_E=0"], "--lr G_E must be > 0"),
    (["--rollback-lr-scale", "2"], "--rollback-lr-scale must be in (0, 1]"),
    (["--loader-workers", "-1"], "--loader-workers must be ≥ 0"),
    (["--model.upsample", "bilinear"], "upsample must be one of transposed, resize_conv"),
    (["--r1-gamma", "G_E=1"], "--r1-gamma: 'G_E' is not a discriminator"),
    (["--r1-gamma", "D_E=-1"], "--r1-gamma D_E must be ≥ 0"),
    (["--r1-gamma", "D_R=10", "--sync-bn"], "the synchronised BatchNorm has no double backward"),
    (["--r1-every", "0"], "--r1-every must be a whole number ≥ 1"),
])
def test_bad_lengths_rates_and_counts_are_refused_before_anything_runs(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--outdir", str(tmp_path), "--dry-run", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, image_folder, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        train_main(["--data", str(image_folder), "--outdir", str(blocker / "runs"), "--device", "cpu"])
    assert e.value.code == 2
    assert f"cannot write in {blocker / 'runs'}" in capsys.readouterr().err


def test_dry_run_prints_the_resolved_config(tmp_path, capsys):
    """Generated flags (nested, dict, tuple, bool) and the README's aliases land in one config."""
    train_main(["--dry-run", "--outdir", str(tmp_path), "--model.resolution", "128", "--kimg", "ae=1.5",
                "--kimg-embed", "2", "--lr-gan", "1e-3", "--lr", "D_R=5e-4", "--betas", "0.1", "0.9",
                "--no-model.denoiser", "--stages", "ae", "embed", "--ema-kimg", "0", "--embed-steps", "3",
                "--eval-metrics", "swd", "--device", "cpu", "--precision", "fp32", "--no-channels-last",
                "--compile", "off"])
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["resolution"] == 128 and cfg["model"]["denoiser"] is False
    # the demo's finetune length kept
    assert cfg["kimg"] == {"ae": 1.5, "embed": 2.0, "finetune": preset("demo").kimg["finetune"]}
    assert (cfg["precision"], cfg["channels_last"], cfg["compile"]) == ("fp32", False, "off")
    assert cfg["lr"] == {"H": 1e-3, "F": 1e-3, "G_E": 1e-3, "D_E": 1e-3, "phi": 1e-3, "D_R": 5e-4}
    assert cfg["betas"] == [0.1, 0.9] and cfg["stages"] == ["ae", "embed"] and cfg["eval_metrics"] == ["swd"]
    assert cfg["ema_kimg"] == 0 and cfg["embed_steps"] == 3 and cfg["device"] == "cpu"
    assert cfg["preset"] == "demo"
    assert not any(tmp_path.iterdir())  # no run dir, no data loaded


def test_demo128_is_the_demos_recipe_at_128_with_its_own_lengths(capsys):
    """--preset demo128 follows every lever of the demo (a lever that joins the demo joins it too);
    only the resolution, the stage lengths and the grid/checkpoint spacing are its own."""
    train_main(["--preset", "demo128", "--dry-run"])
    cfg = json.loads(capsys.readouterr().out)
    demo = json.loads(json.dumps(preset("demo").to_dict()))  # tuples as the JSON's lists
    own = {"preset", "kimg", "sample_every_kimg", "ckpt_every_kimg"}
    assert {k: v for k, v in cfg.items() if k not in own | {"model"}} == \
        {k: v for k, v in demo.items() if k not in own | {"model"}}
    assert cfg["model"] == dict(demo["model"], resolution=128)
    assert cfg["preset"] == "demo128" and sum(cfg["kimg"].values()) < sum(demo["kimg"].values())


def test_every_config_field_is_a_flag(capsys):
    from aegan_fast.config import TrainConfig, _config_fields
    with pytest.raises(SystemExit) as e:
        train_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name, *_ in _config_fields(TrainConfig):
        if name != "preset":
            assert "--" + name.replace("_", "-") in text, name
    assert "half-life of the sampling chain's EMA" in text  # help from the field's comment
    for alias in ("--resolution", "--kimg-ae", "--kimg-finetune", "--lr-ae", "--lr-gan", "--no-denoiser",
                  "--no-progress", "--run-dir", "--resume", "--preset"):
        assert alias in text, alias


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


def test_npm_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))
    with pytest.raises(SystemExit) as e:
        train_main(["--outdir", str(tmp_path / "runs")])
    assert e.value.code == 2 and "needs npm" in capsys.readouterr().err


def _cli(*args):
    """``python -m aegan_fast.train`` in a subprocess: the real entry point, exit code and all."""
    return subprocess.run([sys.executable, "-m", "aegan_fast.train", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_train_resume_and_sample(tmp_path, image_folder):
    run = tmp_path / "run"
    args = ["--data", str(image_folder), "--run-dir", str(run), "--batch", "4", "--kimg-ae", "0.008",
            "--kimg-embed", "0.008", "--kimg-finetune", "0.008", "--no-progress", "--device", "cpu"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done in" in r.stdout and str(run) in r.stdout
    r = _cli(*args)  # the same run dir again: refused, not overwritten, in one line without a traceback
    assert r.returncode == 2 and "--resume" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    with pytest.raises(SystemExit) as e:  # what a run trains is its checkpoint's, not the command line's
        train_main(["--resume", str(run), "--batch", "8"])
    assert e.value.code == 2
    train_main(["--resume", str(run), "--dry-run", "--device", "cpu", "--loader", "torch"])

    with pytest.raises(SystemExit) as e:
        sample_main(["--ckpt", str(run), "--n", "5", "--out", str(tmp_path / "grid.jpg")])
    assert e.value.code == 2
    sample_main(["--ckpt", str(run), "--n", "5", "--seed", "3", "--out", str(tmp_path / "grid.png")])
    sample_main(["--ckpt", str(run), "--n", "3", "--out", str(tmp_path / "imgs") + "/"])
    assert (tmp_path / "grid.png").exists()
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 3


# tiny_config's nets and evaluation sizes as flags
TINY_FLAGS = ["--model.ae-channels", "16", "--model.ge-base-channels", "32", "--model.embed-max-channels", "32",
              "--model.max-channels", "32", "--grid-size", "16", "--eval-n", "16"]


@pytest.mark.slow
def test_no_denoiser_ablation_trains_and_samples_f_of_g_e(tmp_path, image_folder):
    run = tmp_path / "run"
    train_main(["--data", str(image_folder), "--run-dir", str(run), "--batch", "4", "--kimg-ae", "0.008",
                "--kimg-embed", "0.008", "--kimg-finetune", "0.008", "--no-progress", "--device", "cpu",
                "--no-denoiser", *TINY_FLAGS])
    state = load_checkpoint(run)
    assert state["config"]["model"]["denoiser"] is False
    assert not any(k.startswith("phi.") for k in state["nets"]) and "phi" not in state["opts"]
    cfg, nets = load_sampling_nets(run)
    sampled = SamplingChain.of(nets).sample(3, seed=5)
    state = torch.load(resolve_checkpoint(run), weights_only=True)  # the stage the run samples from
    # F(G_E(z)) by hand, from the checkpoint's own (EMA) G_E and F in nets built from another seed
    torch.manual_seed(123)
    fresh = build_nets(cfg.model)
    assert not torch.equal(fresh["G_E"].state_dict()[next(iter(state["ema"]["G_E"]))],
                           next(iter(state["ema"]["G_E"].values())))
    fresh["G_E"].load_state_dict(state["ema"]["G_E"])
    fresh["F"].load_state_dict(state["ema"]["F"])
    fresh.eval()
    with torch.no_grad():
        expected = fresh["F"](fresh["G_E"](sample_z(3, cfg.model.z_dim, torch.Generator().manual_seed(5))))
    torch.testing.assert_close(sampled, expected, rtol=1e-6, atol=1e-6)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("phi") for r in rows if "losses" in r for k in r["losses"])
    sample_main(["--ckpt", str(run), "--n", "4", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").stat().st_size > 100


def test_periodic_checkpoints_are_pruned(tmp_path):
    from aegan_fast.checkpoint import save_checkpoint
    save_checkpoint(tmp_path, "stage-ae.pt", {"n": 0})
    for n in range(1, 6):
        save_checkpoint(tmp_path, f"ckpt-{n * 1000:09d}.pt", {"n": n})
    left = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert left == ["ckpt-000003000.pt", "ckpt-000004000.pt", "ckpt-000005000.pt", "stage-ae.pt"]
    assert load_checkpoint(tmp_path)["n"] == 5


def test_img_per_s_leaves_out_grids_and_checkpoints_but_keeps_their_interval_images(tmp_path, monkeypatch):
    """A fake clock: 2 steps of 1 s each around a 5 s checkpoint are 2 batches in 2 s of training."""
    from aegan_fast.training import run_log as run_log_module
    now = [100.0]
    monkeypatch.setattr(run_log_module.time, "perf_counter", lambda: now[0])
    log = run_log_module.MetricsLog(tmp_path / "metrics.jsonl", "cpu")
    now[0] += 1.0
    log.add({"loss": torch.tensor(1.0)}, 16, 0.0)
    with log.paused():
        now[0] += 5.0
    now[0] += 1.0
    log.add({"loss": torch.tensor(3.0)}, 16, 0.0)
    row = log.flush("ae", {"total_img": 32, "stage_img": 32, "step": 2})
    assert row["img_per_s"] == pytest.approx(32 / 2.0)
    assert row["losses"]["loss"] == pytest.approx(2.0)


def test_a_loss_that_starts_inside_a_log_interval_is_averaged_over_its_own_steps(tmp_path):
    """Stage 1's adversarial term starts after a warm-up, maybe mid-interval: its row is its mean."""
    from aegan_fast.training.run_log import MetricsLog
    log = MetricsLog(tmp_path / "metrics.jsonl", "cpu")
    log.add({"ae_l1": torch.tensor(1.0)}, 8, 0.0)
    log.add({"ae_l1": torch.tensor(1.0)}, 8, 0.0)
    log.add({"ae_l1": torch.tensor(1.0), "D_AE": torch.tensor(2.0)}, 8, 0.0)
    row = log.flush("ae", {"total_img": 24, "stage_img": 24, "step": 3})
    assert row["losses"] == {"ae_l1": 1.0, "D_AE": 2.0}
