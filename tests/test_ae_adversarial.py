"""Stage 1's adversarial term (--ae-adv-weight): D_AE, a patch discriminator judging F(H(x)) against x.

Off, and on before its warm-up, a stage-1 step is the plain L1 step (checked against an update written
out here, not against the trainer's own code); after it, D_AE learns and H/F's gradient is L1's plus
the weighted hinge term. D_AE lives in checkpoints (exact resume: tests/test_resume.py) and nowhere a
sampler, the EMA or an export looks; --init-from between runs with and without it works both ways.
"""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from aegan_fast.checkpoint import load_checkpoint, save_checkpoint
from aegan_fast.data import load_folder
from aegan_fast.models import SAMPLING_CHAIN
from aegan_fast.sampling import Sampler
from aegan_fast.train import main as train_main
from aegan_fast.training import enter_stage, new_state, take_step, train
from aegan_fast.training.run_state import load_sampling_nets, read_init_source
from aegan_fast.training.stages import AE
from conftest import make_image_folder, tiny_config

WEIGHT = 0.5
ON = dict(ae_adv_weight=WEIGHT, ae_adv_start_kimg=0.008)  # 2 steps of L1 alone at batch 4


def _stage_1(image_folder, **overrides):
    """A fresh fp32 state in stage 1 (the trainer's set-up) and one fixed batch."""
    st = new_state(tiny_config(precision="fp32", seed=0, **overrides), load_folder(image_folder, 64), "cpu")
    enter_stage(AE, st)
    idx, mirror = torch.arange(4), torch.tensor([False, True, False, True])
    return st, st.batch(st.data.gather(idx, mirror, "cpu"), idx, mirror)


def _snapshot(net) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def _plain_l1_update(st, batch):
    """Copies of H and F after one L1 step written out here: F.l1_loss, backward, one fused Adam per
    net at the stage's rates. Must be taken before the trainer's step."""
    H, Fd = copy.deepcopy(st.nets["H"]), copy.deepcopy(st.nets["F"])
    opts = [torch.optim.Adam(net.parameters(), lr=st.cfg.lr[name], betas=st.cfg.betas, fused=True)
            for name, net in (("H", H), ("F", Fd))]
    F.l1_loss(Fd(H(batch.x)), batch.x).backward()
    for opt in opts:
        opt.step()
    return H, Fd


def _assert_same(net, twin):
    theirs = twin.state_dict()
    for k, v in net.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(v, theirs[k]), k


def test_off_the_stage_1_step_is_the_plain_l1_step(image_folder):
    st, batch = _stage_1(image_folder)
    assert "D_AE" not in st.nets and "D_AE" not in st.opts
    H, Fd = _plain_l1_update(st, batch)
    assert set(take_step(AE, st, batch, None)) == {"ae_l1"}
    _assert_same(st.nets["H"], H)
    _assert_same(st.nets["F"], Fd)


def test_before_its_warm_up_the_term_changes_nothing(image_folder):
    st, batch = _stage_1(image_folder, **ON)
    st.counters["stage_img"] = 4  # one step short of 8
    d_ae = _snapshot(st.nets["D_AE"])
    H, Fd = _plain_l1_update(st, batch)
    assert set(take_step(AE, st, batch, None)) == {"ae_l1"}
    _assert_same(st.nets["H"], H)
    _assert_same(st.nets["F"], Fd)
    after = st.nets["D_AE"].state_dict()
    assert all(torch.equal(v, after[k]) for k, v in d_ae.items())  # spectral-norm vectors included


def test_after_its_warm_up_d_ae_learns_and_h_f_follow_l1_plus_the_weighted_hinge_term(image_folder):
    st, batch = _stage_1(image_folder, **ON)
    st.counters["stage_img"] = 8
    d_before = _snapshot(st.nets["D_AE"])
    H, Fd = copy.deepcopy(st.nets["H"]), copy.deepcopy(st.nets["F"])
    logged = take_step(AE, st, batch, None)
    assert set(logged) == {"ae_l1", "D_AE", "ae_adv"}

    d_after = st.nets["D_AE"].state_dict()
    assert any(not torch.equal(d_before[k], v) for k, v in d_after.items() if "original" in k)
    assert st.nets["D_AE"].training  # stage 1 trains it
    # H and F's gradient, written out: the D_AE they were judged by is the updated one (in eval mode
    # it reuses the spectral-norm vectors the step's last forward left).
    judge = copy.deepcopy(st.nets["D_AE"]).eval()
    rec = Fd(H(batch.x))
    l1 = F.l1_loss(rec, batch.x)
    params = [*H.parameters(), *Fd.parameters()]
    want = torch.autograd.grad(l1 + WEIGHT * -judge(rec).mean(), params, retain_graph=True)
    l1_only = torch.autograd.grad(l1, params)
    got = [p.grad for p in (*st.nets["H"].parameters(), *st.nets["F"].parameters())]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert max((g - w).abs().max().item() for g, w in zip(got, l1_only)) > 1e-4 * max(
        w.abs().max().item() for w in l1_only)
    torch.testing.assert_close(logged["ae_l1"], l1.detach())


def test_d_ae_steps_at_d_r_rate_unless_given_its_own(image_folder):
    rates = {**tiny_config().lr, "D_R": 3e-4}  # D_R's apart from every other net's
    st, _ = _stage_1(image_folder, **ON, lr=rates)
    assert st.opts["D_AE"].param_groups[0]["lr"] == 3e-4
    st, _ = _stage_1(image_folder, **ON, lr={**rates, "D_AE": 1e-5})
    assert st.opts["D_AE"].param_groups[0]["lr"] == 1e-5


@pytest.fixture(scope="module")
def adv_run(tmp_path_factory):
    """A tiny run with the term on: stage 1 (2 steps of L1, then 2 with D_AE), then stage 2."""
    root = tmp_path_factory.mktemp("adv")
    images = make_image_folder(root / "images")
    run = root / "run"
    run.mkdir()
    cfg = tiny_config(**ON, stages=("ae", "embed"), kimg={"ae": 0.016, "embed": 0.016})
    train(cfg, run, progress=False, data=load_folder(images, 64, cache=root / "cache", progress=False))
    return run


def test_a_run_keeps_d_ae_in_its_checkpoints_and_logs_its_losses_after_the_warm_up(adv_run):
    final = load_checkpoint(adv_run)
    stage_1 = load_checkpoint(adv_run / "checkpoints" / "stage-ae.pt")
    d_keys = [k for k in final["nets"] if k.startswith("D_AE.")]
    assert d_keys and final["opts"]["D_AE"]["state"]
    for k in d_keys:  # idle in stage 2: eval mode, no gradients, not a step
        assert torch.equal(stage_1["nets"][k], final["nets"][k]), k
    rows = [json.loads(line) for line in (adv_run / "metrics.jsonl").read_text().splitlines()]
    ae = [set(r["losses"]) for r in rows if r.get("stage") == "ae" and "losses" in r]
    assert ae == [{"ae_l1"}, {"ae_l1", "D_AE", "ae_adv"}]  # a row every 2 steps: warm-up, then the term
    assert set(final["ema"]) == set(SAMPLING_CHAIN)


def test_samplers_and_exports_never_see_d_ae(adv_run):
    """load_sampling_nets is what the Sampler, eval, export and TrainedModel read."""
    cfg, nets = load_sampling_nets(adv_run)
    assert cfg.ae_adv_weight == WEIGHT and "D_AE" not in nets
    sampler = Sampler.load(adv_run, backend="torch")
    assert sampler.sample(2, seed=0).shape == (2, 3, 64, 64)


def test_init_from_a_run_without_d_ae_starts_it_fresh(adv_run, tmp_path, image_folder, caplog):
    state = load_checkpoint(adv_run)
    state["nets"] = {k: v for k, v in state["nets"].items() if not k.startswith("D_AE.")}
    state["config"]["ae_adv_weight"] = 0.0
    source = save_checkpoint(tmp_path, "plain.pt", state)
    init = read_init_source(source)
    cfg = tiny_config(**ON, init_from=str(source), freeze_d=1)
    with caplog.at_level(logging.INFO, logger="aegan_fast.training"):
        st = new_state(cfg, load_folder(image_folder, 64), "cpu", init=init)
    assert "has no D_AE" in caplog.text and "D_AE starts fresh" in caplog.text
    nets = st.nets.state_dict()
    for k, v in init.nets.items():
        assert torch.equal(nets[k], v), k
    assert "D_AE" in st.opts  # --freeze-d holds D_E's and D_R's blocks only


def test_init_from_a_run_with_d_ae_into_one_without_leaves_it_out(adv_run, image_folder, caplog):
    with caplog.at_level(logging.INFO, logger="aegan_fast.training"):
        st = new_state(tiny_config(init_from=str(adv_run)), load_folder(image_folder, 64), "cpu",
                       init=read_init_source(adv_run))
    assert "D_AE" not in st.nets and "its D_AE is not used" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--ae-adv-weight", "-1"], "--ae-adv-weight must be a finite number ≥ 0 (0: off), got -1"),
    (["--ae-adv-weight", "nan"], "--ae-adv-weight must be a finite number ≥ 0"),
    (["--ae-adv-weight", "inf"], "--ae-adv-weight must be a finite number ≥ 0"),
    (["--ae-adv-start-kimg", "-2"], "--ae-adv-start-kimg must be ≥ 0, got -2"),
    (["--ae-adv-weight", "0.1", "--stages", "embed", "finetune"], "trains D_AE in stage ae, which this run does not have"),
    (["--ae-adv-weight", "0.1", "--kimg", "ae=5"], "--ae-adv-start-kimg 20.0 is not before stage ae's end"),
    (["--lr", "D_AE=0"], "--lr D_AE must be > 0"),
    (["--lr", "D_X=1"], "choose from H, F, G_E, D_E, phi, D_R, D_AE"),
])
def test_bad_values_are_one_clear_line(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--outdir", str(tmp_path), "--dry-run", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_the_flags_land_in_the_config(tmp_path, capsys):
    train_main(["--outdir", str(tmp_path), "--dry-run", "--ae-adv-weight", "0.1", "--ae-adv-start-kimg", "5",
                "--lr", "D_AE=1e-4"])
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["ae_adv_weight"], cfg["ae_adv_start_kimg"], cfg["lr"]["D_AE"]) == (0.1, 5.0, 1e-4)
