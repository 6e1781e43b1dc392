"""Fine-tuning (issue 25, part 5): ``train --init-from RUN_OR_CKPT`` starts a new run from another run's
nets, ``--init-from-stage`` picks its first stage and ``--freeze-d N`` keeps discriminator blocks as loaded.

The source is the session's tiny_run (read, never written: a test that must change it copies it).
What a new run starts from is checked against the source file's tensors read here with torch.load,
never against an object the trainer itself loaded."""
import dataclasses
import hashlib
import json
import shutil

import pytest
import torch

from aegan_fast.checkpoint import load_checkpoint, resolve_checkpoint
from aegan_fast.config import preset
from aegan_fast.data import ImageSet, load_folder, make_loader
from aegan_fast.models import ModelConfig, build_nets
from aegan_fast.train import main as train_main
from aegan_fast.training import new_state, stages, train
from aegan_fast.training.run_state import read_init_source
from aegan_fast.errors import UserError
from conftest import make_image_folder, tiny_config

ZERO = {"stage_img": 0, "stage_s": 0.0, "total_img": 0, "step": 0}


def _source_file(run):
    """The file --init-from RUN reads (the checkpoint the run samples from), its tensors and sha256,
    read here independently of the trainer."""
    path = resolve_checkpoint(run)
    return path, torch.load(path, weights_only=True), hashlib.sha256(path.read_bytes()).hexdigest()


def _new_folder(tmp_path):
    """Another folder than the source's: 14 other discs."""
    return make_image_folder(tmp_path / "new", n=14, seed=1)


def _new_data(tmp_path, resolution=64) -> ImageSet:
    """The new folder with a held-out split of its own (4 of 14; a folder this small holds none out)."""
    ds = load_folder(_new_folder(tmp_path), resolution, progress=False)
    return ImageSet(ds.images, ds.origin, holdout=4)


def _fine_tune_config(run, **overrides):
    return tiny_config(**{"init_from": str(run), "stages": ("embed", "finetune"), **overrides})


def test_a_fine_tune_run_starts_from_the_source_nets_with_its_own_counters_split_and_optimizers(tiny_run, tmp_path):
    run, _ = tiny_run
    src_path, src, digest = _source_file(run)
    assert src["counters"]["total_img"] > 0 and src["ema"] is not None
    new = tmp_path / "ft"
    new.mkdir()
    train(_fine_tune_config(run), new, progress=False, stop_after_steps=1, data=_new_data(tmp_path))

    start = torch.load(new / "checkpoints" / "ckpt-000000000.pt", weights_only=True)  # step 0, as loaded
    assert start["nets"].keys() == src["nets"].keys()
    for k, v in start["nets"].items():
        assert torch.equal(v, src["nets"][k]), k
    assert start["ema"].keys() == src["ema"].keys()
    for net, sd in start["ema"].items():
        for k, v in sd.items():
            assert torch.equal(v, src["ema"][net][k]), (net, k)
    fresh = build_nets(tiny_config().model).state_dict()  # what the seed alone would have given
    assert any(not torch.equal(v, fresh[k]) for k, v in start["nets"].items())

    assert start["counters"] == {"stage": "embed", **ZERO}
    assert all(not opt["state"] for opt in start["opts"].values())  # no Adam moments carried over
    assert start["data"] == {"count": 14, "holdout": 4} != src["data"]
    assert start["config"]["init_from"] == str(src_path.resolve())
    assert start["config"]["init_from_sha256"] == digest
    assert json.loads((new / "config.json").read_text())["init_from_sha256"] == digest

    after = load_checkpoint(new)  # the step it then took counts from zero
    assert after["counters"] == {**after["counters"], "stage": "embed", "step": 1, "total_img": 4}


def test_the_source_ema_is_kept_only_when_the_run_starts_with_an_ema_stage(tiny_run, tmp_path):
    run, _ = tiny_run
    _, src, _ = _source_file(run)
    data = _new_data(tmp_path)
    init = read_init_source(run)
    st = new_state(_fine_tune_config(run), data, "cpu", init=init)
    for k, v in st.ema.nets["G_E"].state_dict().items():
        assert torch.equal(v, src["ema"]["G_E"][k]), k
    # Retraining the autoencoder first: the EMA starts from the nets at stage 2, as in every run.
    st = new_state(_fine_tune_config(run, stages=("ae", "embed", "finetune")), data, "cpu", init=init)
    assert st.ema is None and st.counters == {"stage": "ae", **ZERO}


def test_resuming_a_fine_tune_run_needs_no_source(tiny_run, tmp_path):
    """The source is read once: with it gone, the run resumes from its own checkpoints, through the CLI."""
    source = tmp_path / "source"
    shutil.copytree(tiny_run[0], source)
    new = tmp_path / "ft"
    new.mkdir()
    cfg = _fine_tune_config(source, data=str(_new_folder(tmp_path)), kimg={"embed": 0.008, "finetune": 0.004},
                            eval_n=8, grid_size=4)
    train(cfg, new, progress=False, stop_after_steps=1)
    shutil.rmtree(source)
    train_main(["--resume", str(new), "--no-progress"])
    state = load_checkpoint(new)
    assert state["counters"]["stage"] == "done" and state["counters"]["total_img"] == 12
    assert state["config"]["init_from"].startswith(str(source))


def test_cli_takes_the_model_from_the_checkpoint_and_starts_at_the_chosen_stage(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    _, src, digest = _source_file(run)

    def dry(*args):
        train_main(["--init-from", str(run), "--dry-run", "--outdir", str(tmp_path), *args])
        return json.loads(capsys.readouterr().out)

    cfg = dry()
    assert cfg["model"] == src["config"]["model"] != preset("demo").model.to_dict()
    assert cfg["stages"] == ["embed", "finetune"] and cfg["init_from_sha256"] == digest
    assert cfg["batch"] == 32  # the training settings are the preset's, not the source's
    assert dry("--init-from-stage", "ae")["stages"] == ["ae", "embed", "finetune"]
    assert dry("--init-from-stage", "finetune", "--model.max-channels", "32")["stages"] == ["finetune"]
    assert dry("--stages", "direct", "--kimg", "direct=1")["stages"] == ["direct"]  # as given, without embed
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, wanted", [
    (["--resolution", "128"], ["model.resolution", "64", "128"]),
    (["--model.max-channels", "64"], ["model.max_channels", "32", "64"]),
    (["--no-denoiser"], ["model.denoiser", "True", "False"]),
    (["--init-from-stage", "direct"], ["--init-from-stage", "direct", "not one of"]),
])
def test_cli_flags_that_contradict_the_checkpoint_are_refused(tiny_run, tmp_path, capsys, args, wanted):
    with pytest.raises(SystemExit) as e:  # --dry-run: the checks come first, and a missed one trains nothing
        train_main(["--init-from", str(tiny_run[0]), "--dry-run", "--outdir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in wanted), err
    assert not any(tmp_path.iterdir())


def _first_mismatch(model: ModelConfig, tensors: dict) -> tuple[str, list, list]:
    for k, v in build_nets(model).state_dict().items():
        if k in tensors and tensors[k].shape != v.shape:
            return k, list(tensors[k].shape), list(v.shape)
    raise AssertionError("no mismatch")


@pytest.mark.parametrize("change", [dict(resolution=128), dict(max_channels=16)])
def test_a_checkpoint_of_another_architecture_names_the_first_mismatching_tensor(tiny_run, tmp_path, change):
    run, _ = tiny_run
    _, src, _ = _source_file(run)
    cfg = _fine_tune_config(run)
    cfg.model = dataclasses.replace(cfg.model, **change)
    name, theirs, ours = _first_mismatch(cfg.model, src["nets"])
    (tmp_path / "ft").mkdir()
    with pytest.raises(UserError) as e:
        train(cfg, tmp_path / "ft", progress=False, data=_new_data(tmp_path, cfg.model.resolution))
    assert f"{name} is {theirs}, this model's {ours}" in str(e.value)


def test_a_checkpoint_whose_tensors_do_not_fit_its_config_fails_before_a_run_exists(tiny_run, tmp_path, capsys):
    _, src, _ = _source_file(tiny_run[0])
    src["config"]["model"]["ae_channels"] = 8
    bad = tmp_path / "doctored.pt"
    torch.save(src, bad)
    name, theirs, ours = _first_mismatch(ModelConfig.from_dict(src["config"]["model"]), src["nets"])
    assert name.startswith("H.")
    with pytest.raises(SystemExit) as e:  # tiny data and lengths: a missed check fails fast, not after a demo run
        train_main(["--init-from", str(bad), "--data", str(_new_folder(tmp_path)), "--outdir", str(tmp_path / "runs"),
                    "--kimg", "embed=0.004", "finetune=0.004", "--batch", "4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{name} is {theirs}, this model's {ours}" in err, err
    assert not (tmp_path / "runs").exists()


def _garbage(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    return tmp_path / "garbage.pt"


def _not_training(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    return tmp_path / "list.pt"


def _not_a_run(tmp_path):
    (tmp_path / "folder").mkdir()
    return tmp_path / "folder"


@pytest.mark.parametrize("make, wanted", [
    (lambda tmp: tmp / "missing", "no run directory or checkpoint"),
    (_garbage, "truncated or corrupt"),
    (_not_training, "not an aegan_fast training checkpoint"),
    (_not_a_run, "holds no checkpoint"),
])
def test_bad_init_paths_exit_2_in_one_line(tmp_path, capsys, make, wanted):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as e:
        train_main(["--init-from", str(path), "--dry-run", "--outdir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and wanted in err and str(path) in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, wanted", [
    (["--init-from-sha256", "0" * 64], "has sha256"),
    (["--freeze-d", "3"], "D_E has only 2 blocks"),
    (["--freeze-d", "-1"], "--freeze-d must be ≥ 0"),
])
def test_bad_fine_tune_settings_exit_2(tiny_run, tmp_path, capsys, args, wanted):
    with pytest.raises(SystemExit) as e:
        train_main(["--init-from", str(tiny_run[0]), "--dry-run", "--outdir", str(tmp_path / "runs"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and wanted in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, wanted", [
    (["--freeze-d", "1"], "needs --init-from"),
    (["--init-from-stage", "embed"], "needs --init-from"),
])
def test_fine_tune_flags_without_a_source_exit_2(tmp_path, capsys, args, wanted):
    with pytest.raises(SystemExit) as e:
        train_main(["--dry-run", *args])
    assert e.value.code == 2 and wanted in capsys.readouterr().err


def test_discriminator_blocks_are_its_convolutions_before_the_logit():
    for r, d_e, d_r in ((64, 2, 5), (128, 3, 6), (256, 4, 7)):
        assert stages.d_block_counts(ModelConfig(resolution=r)) == {"D_E": d_e, "D_R": d_r}
    nets = build_nets(ModelConfig(resolution=128))
    # D_R: each stride-2 layer (conv, BN, activation); D_E: a 3×3 conv with its activation, a 3×3 conv
    # with its BatchNorm+activation, then each stride-2 layer; neither logit conv
    assert [[id(p) for p in b] for b in stages.d_blocks(nets["D_R"])] == \
        [[id(p) for p in layer.parameters()] for layer in nets["D_R"].net[:-1]]
    d_e = nets["D_E"].net
    assert [[id(p) for p in b] for b in stages.d_blocks(nets["D_E"])] == \
        [[id(p) for p in d_e[0].parameters()], [id(p) for p in d_e[2].parameters()] +
         [id(p) for p in d_e[3].parameters()], [id(p) for p in d_e[4].parameters()]]


def test_freeze_d_keeps_the_first_blocks_bit_identical_and_trains_the_rest(tiny_run, tmp_path):
    """Steps of stages 2 and 3 with --freeze-d 2: the frozen blocks' weights equal the source's bit for
    bit, no optimizer holds them and no backward gives them a gradient; every later block moved."""
    run, _ = tiny_run
    _, src, _ = _source_file(run)
    data = _new_data(tmp_path).split("train")
    cfg = _fine_tune_config(run, freeze_d=2)
    st = new_state(cfg, data, "cpu", init=read_init_source(run), guard=False)
    loader = make_loader("torch", data, cfg.batch, cfg.seed, "cpu")
    for stage in (stages.EMBED, stages.FINETUNE):
        st.counters["stage_img"] = 0
        stages.run_stage(stage, st, loader, until_img=2 * cfg.batch)
    loader.close()
    names = {id(p): k for k, p in st.nets.named_parameters()}
    held = {id(p) for opt in st.opts.values() for group in opt.param_groups for p in group["params"]}
    for d in stages.FREEZABLE:
        blocks = stages.d_blocks(st.nets[d])
        for p in (p for block in blocks[:2] for p in block):
            assert torch.equal(p.detach(), src["nets"][names[id(p)]]), names[id(p)]
            assert id(p) not in held and p.grad is None and not p.requires_grad, names[id(p)]
        later = [p for block in blocks[2:] for p in block] + list(st.nets[d].net[-1].parameters())
        for p in later:
            assert not torch.equal(p.detach(), src["nets"][names[id(p)]]), names[id(p)]
            assert id(p) in held, names[id(p)]
