"""A few steps of each stage on a tiny fixed batch lower that stage's objective; the adversarial
losses and the EMA do what they say."""
import copy

import pytest
import torch
from torch import nn

from aegan_fast import losses, ops
from aegan_fast.data import load_folder
from aegan_fast.config import TrainConfig
from aegan_fast.models import ModelConfig, SamplingChain, build_nets, sample_z
from aegan_fast.training import enter_stage, new_state, take_step
from aegan_fast.training.stages import (EMA, STAGES, RealEmbeddings, _d_step, lazy_r1, decay_rates, make_optimizers,
                                        prepare_stage, requires_grad, start_stage)
from conftest import tiny_config
from ops_parity import count_fused_forwards

STEPS = {name: stage.step for name, stage in STAGES.items()}


def _setup(stage, image_folder, cache_mb=1e9, denoiser=True, **overrides):
    """The trainer's own set-up (new_state, enter_stage) on the image folder, fp32, one fixed batch."""
    cfg = tiny_config(**{"precision": "fp32", "embed_cache_mb": cache_mb, "seed": 0, **overrides})
    cfg.model.denoiser = denoiser
    st = new_state(cfg, load_folder(image_folder, 64), "cpu", guard=False)
    emb = enter_stage(STAGES[stage], st)
    idx, mirror = torch.arange(4), torch.tensor([False, True, False, True])
    return cfg, st.nets, st.opts, st.batch(st.data.gather(idx, mirror, "cpu"), idx, mirror), emb


def _run(stage, image_folder, objective, steps, **overrides):
    cfg, nets, opts, batch, emb = _setup(stage, image_folder, **overrides)
    values = [objective(STEPS[stage](nets, opts, batch, emb, cfg), cfg) for _ in range(steps)]
    return values


def test_ae_stage_lowers_l1_clearly(image_folder):
    l1 = _run("ae", image_folder, lambda l, cfg: l["ae_l1"].item(), 25)
    assert l1[-1] < 0.6 * l1[0], l1


def test_embed_stage_lowers_denoiser_objective(image_folder):
    obj = _run("embed", image_folder, lambda l, cfg: (l["phi_adv"] + cfg.denoiser_l1 * l["phi_l1"]).item(), 15)
    assert sum(obj[-3:]) < 0.7 * sum(obj[:3]), obj


def test_embed_stage_discriminators_learn(image_folder):
    d_e = _run("embed", image_folder, lambda l, cfg: l["D_E"].item(), 15)
    assert min(d_e[-3:]) < d_e[0], d_e


def test_finetune_stage_lowers_reconstruction_and_d_r_loss(image_folder):
    """At the stage's own (scaled-down) rates: F keeps learning to decode real embeddings while D_R
    learns to judge the chain's output; φ's tie to its input does not come loose."""
    parts = _run("finetune", image_folder, lambda l, cfg: {k: v.item() for k, v in l.items()}, 15)
    first, last = parts[0], parts[-1]
    assert last["F_rec"] < 0.95 * first["F_rec"], parts
    assert min(p["D_R"] for p in parts[-3:]) < first["D_R"], parts
    assert last["phi_l1"] < 1.5 * first["phi_l1"], parts


def test_frozen_nets_do_not_move_in_stage_2(image_folder):
    cfg, nets, opts, batch, emb = _setup("embed", image_folder)
    before = {k: v.clone() for k, v in nets["H"].state_dict().items()} | \
             {"F." + k: v.clone() for k, v in nets["F"].state_dict().items()}
    STEPS["embed"](nets, opts, batch, emb, cfg)
    after = nets["H"].state_dict() | {"F." + k: v for k, v in nets["F"].state_dict().items()}
    for k in before:  # weights and BatchNorm running statistics alike
        torch.testing.assert_close(before[k], after[k], rtol=0, atol=0)
    assert not nets["H"].training and not nets["F"].training


def test_embedding_cache_equals_encoder(image_folder):
    cfg, nets, opts, batch, emb = _setup("embed", image_folder)
    assert emb.table is not None
    with torch.no_grad():
        torch.testing.assert_close(emb.of(batch), nets["H"](batch.x))
    _, _, _, _, uncached = _setup("embed", image_folder, cache_mb=0)
    assert uncached.table is None and uncached.random(3).shape == (3, 64, 4, 4)


def _weights(nets, names):
    return {f"{n}.{k}": v.clone() for n in names for k, v in nets[n].state_dict().items()}


def _moved(before, nets):
    after = {f"{n}.{k}": v for n in nets for k, v in nets[n].state_dict().items()}
    return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


def test_direct_gan_trains_the_whole_chain_against_d_r_only(image_folder):
    """The experiment's baseline: G_E, F and φ all learn from D_R's verdict on the final image;
    H and D_E (the autoencoder bridge) play no part."""
    cfg, nets, opts, batch, _ = _setup("direct", image_folder)
    before = _weights(nets, nets.keys())
    parts = [{k: v.item() for k, v in STEPS["direct"](nets, opts, batch, None, cfg).items()} for _ in range(15)]
    assert _moved(before, nets) == {"G_E", "F", "phi", "D_R"}
    assert min(p["D_R"] for p in parts[-3:]) < parts[0]["D_R"], parts


def test_without_denoiser_stage_2_trains_the_embedding_gan_only(image_folder):
    cfg, nets, opts, batch, emb = _setup("embed", image_folder, denoiser=False)
    assert isinstance(nets["phi"], torch.nn.Identity) and "phi" not in opts
    before = _weights(nets, nets.keys())
    d_e = [STEPS["embed"](nets, opts, batch, emb, cfg) for _ in range(15)]
    assert set(d_e[0]) == {"D_E", "G_E"}
    assert _moved(before, nets) == {"G_E", "D_E"}  # D_R waits for stage 3: nothing to judge yet
    assert min(l["D_E"].item() for l in d_e[-3:]) < d_e[0]["D_E"].item()


def test_without_denoiser_stage_3_trains_g_e_and_f_against_d_r(image_folder):
    cfg, nets, opts, batch, emb = _setup("finetune", image_folder, denoiser=False)
    before = _weights(nets, nets.keys())
    parts = [{k: v.item() for k, v in STEPS["finetune"](nets, opts, batch, emb, cfg).items()} for _ in range(15)]
    assert _moved(before, nets) == {"G_E", "F", "D_E", "D_R"}
    assert parts[-1]["F_rec"] < 0.95 * parts[0]["F_rec"], parts
    assert not any("phi_l1" in p for p in parts)  # no φ, no tie to log (not a 0 that looks like one)


def test_stage_3_starts_f_with_fresh_adam_moments(image_folder):
    """F's moments from stage 1 would scale its first stage-3 updates by their stale, tiny second
    moments; cleared, Adam's first step moves no weight by more than the learning rate."""
    cfg, nets, opts, batch, _ = _setup("ae", image_folder)
    for _ in range(5):
        STEPS["ae"](nets, opts, batch, None, cfg)
    prepare_stage(STAGES["finetune"], nets, opts, cfg)
    emb = RealEmbeddings(nets["H"], load_folder(image_folder, 64), torch.Generator().manual_seed(0), "cpu",
                         64 * 16, max_bytes=0)
    h_state = {id(p): v["exp_avg_sq"].clone() for p, v in opts["H"].state.items()}
    start_stage(STAGES["finetune"], opts)
    assert not opts["F"].state and len(opts["H"].state) == len(h_state)  # only F's are cleared
    before = [p.detach().clone() for p in nets["F"].parameters()]
    STEPS["finetune"](nets, opts, batch, emb, cfg)
    lr = cfg.lr["F"] * cfg.finetune_lr_scale
    largest = max((p.detach() - b).abs().max().item() for p, b in zip(nets["F"].parameters(), before))
    assert 0 < largest <= lr * 1.001, (largest, lr)


def test_decoder_takes_the_generator_rate_where_it_is_a_generator_layer():
    """In the direct baseline F is a generator layer and steps at G_E's rate, not the autoencoder's
    (the fair-comparison policy of bench/paper_claim.py); in the AEGAN stages it keeps its own."""
    cfg = TrainConfig(lr={"H": 1e-3, "F": 1e-3, "G_E": 2e-4, "D_E": 3e-4, "phi": 2e-4, "D_R": 4e-4})
    nets = build_nets(ModelConfig(resolution=64, max_channels=32))
    opts = make_optimizers(nets, cfg)
    expect = {"ae": {"H": 1e-3, "F": 1e-3}, "embed": {"G_E": 2e-4, "D_E": 3e-4, "D_R": 4e-4},
              "finetune": {"F": 1e-3 * cfg.finetune_lr_scale, "G_E": 2e-4 * cfg.finetune_lr_scale},
              "direct": {"F": 2e-4, "G_E": 2e-4, "phi": 2e-4, "D_R": 4e-4}}
    for stage, rates in expect.items():
        prepare_stage(STAGES[stage], nets, opts, cfg, lr_scale=0.5)
        got = {name: opts[name].param_groups[0]["lr"] for name in rates}
        assert got == pytest.approx({k: v * 0.5 for k, v in rates.items()}), stage


def test_stage_1_rates_follow_the_cosine_to_their_final_fraction():
    """--ae-lr-final: 1 at the start, the final fraction at the end, half-way at the middle, from the
    stage's own rate (a rollback's lowered rate included); the other stages keep constant rates."""
    cfg = TrainConfig(lr={"H": 1e-3, "F": 1e-3, "G_E": 2e-4, "D_E": 2e-4, "phi": 2e-4, "D_R": 2e-4}, ae_lr_final=0.1)
    nets = build_nets(ModelConfig(resolution=64, max_channels=32))
    opts = make_optimizers(nets, cfg)
    prepare_stage(STAGES["ae"], nets, opts, cfg, lr_scale=0.5)
    assert STAGES["ae"].final_rate(cfg) == 0.1 and STAGES["embed"].final_rate(cfg) == 1.0
    for progress, factor in ((0.0, 1.0), (0.5, 0.55), (1.0, 0.1), (2.0, 0.1)):
        decay_rates({k: opts[k] for k in ("H", "F")}, 0.1, progress)
        assert opts["F"].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * factor), progress
    prepare_stage(STAGES["embed"], nets, opts, cfg)  # a new stage starts from its own rates
    assert opts["G_E"].param_groups[0]["lr"] == pytest.approx(2e-4)


@pytest.mark.parametrize("kind", ["bce", "hinge", "lsgan"])
def test_adversarial_losses_train_d_then_g(image_folder, kind):
    """D's steps lower its loss and widen its real/fake margin; then G's steps, against that D,
    raise D's verdict on G's output. A loss with a wrong sign or target fails one of the two."""
    cfg, nets, opts, batch, emb = _setup("embed", image_folder, loss=kind)
    D, G = nets["D_E"], nets["G_E"]
    z = sample_z(8, cfg.model.z_dim, torch.Generator().manual_seed(1))
    e_real = emb.of(batch)
    with torch.no_grad():
        e_fake = G(z)
        margin_before = (D(e_real).mean() - D(e_fake).mean()).item()
    d = [_d_step(D, opts["D_E"], kind, e_real, e_fake).item() for _ in range(10)]
    with torch.no_grad():
        margin_after = (D(e_real).mean() - D(e_fake).mean()).item()
    assert d[-1] < d[0] and margin_after > margin_before, (d, margin_before, margin_after)

    requires_grad(D, False)
    D.eval()  # a fixed judge: its verdict must move because G moved
    with torch.no_grad():
        verdict_before = D(G(z)).mean().item()
    g = []
    for _ in range(10):
        loss = losses.g_loss(kind, D(G(z)))
        opts["G_E"].zero_grad()
        loss.backward()
        opts["G_E"].step()
        g.append(loss.item())
    with torch.no_grad():
        verdict_after = D(G(z)).mean().item()
    assert g[-1] < g[0] and verdict_after > verdict_before, (g, verdict_before, verdict_after)


def test_ema_follows_its_half_life_and_copies_buffers(image_folder):
    cfg, nets, opts, batch, _ = _setup("embed", image_folder)
    ema = EMA(nets, half_life_kimg=0.008)  # 8 images: two updates of batch 4 halve the distance
    start = {k: p.detach().clone() for k, p in ema.nets["G_E"].named_parameters()}
    with torch.no_grad():
        for p in nets["G_E"].parameters():
            p.add_(torch.randn_like(p))
        for b in nets["F"].buffers():
            if b.dtype.is_floating_point:
                b.add_(torch.rand_like(b) + 1)
    live = {k: p.detach().clone() for k, p in nets["G_E"].named_parameters()}
    beta = 0.5 ** (4 / 8)
    for k in range(1, 4):
        ema.update(nets, 4)
        for name, p in ema.nets["G_E"].named_parameters():  # closed form: live + β^k (start - live)
            torch.testing.assert_close(p, live[name] + beta ** k * (start[name] - live[name]), rtol=1e-5,
                                       atol=1e-6, msg=f"{name} after {k} updates")
    for (name, b_ema), b in zip(ema.nets["F"].named_buffers(), nets["F"].buffers()):
        assert torch.equal(b_ema, b), name  # running statistics copied, not averaged


def test_chain_preview_uses_the_ema_weights(image_folder, monkeypatch, tmp_path):
    from aegan_fast.training import run_log as run_log_mod
    cfg, nets, opts, batch, emb = _setup("embed", image_folder)
    ema = EMA(nets, half_life_kimg=1.0)
    for _ in range(2):
        STEPS["embed"](nets, opts, batch, emb, cfg)
        ema.update(nets, 4)
    shown = []
    monkeypatch.setattr(run_log_mod, "save_grid", lambda images, path, **kw: shown.append(images.clone()))
    z = sample_z(4, cfg.model.z_dim, torch.Generator().manual_seed(2))
    run_log_mod.save_chain_samples(nets, ema, z, None, tmp_path / "x.png")
    nets.eval()
    with torch.no_grad():  # the EMA's own nets, composed by hand
        expected = ema.nets["phi"](ema.nets["F"](ema.nets["G_E"](z)))
        live = SamplingChain.of(nets)(z)
    torch.testing.assert_close(shown[0], expected)
    assert not torch.allclose(shown[0], live)  # the EMA lags the live nets: a different picture


def test_r1_penalty_is_the_squared_input_gradient_and_its_gradient():
    """For a linear D(x) = w·x + b the input gradient is w for every sample: R1 = ‖w‖², ∂R1/∂w = 2w."""
    torch.manual_seed(3)
    D = nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 7, 1))
    real = torch.randn(6, 3, 5, 7)
    logits, penalty = losses.r1_penalty(D, real)
    w = D[1].weight.detach()
    torch.testing.assert_close(logits, D(real), rtol=0, atol=0)
    torch.testing.assert_close(penalty, w.square().sum(), rtol=1e-6, atol=0)
    penalty.backward()
    torch.testing.assert_close(D[1].weight.grad, 2 * w, rtol=1e-6, atol=0)


def _plain_twin(D: nn.Module) -> nn.Module:
    """D with every fused BatchNorm+activation replaced by stock nn.BatchNorm2d + nn.LeakyReLU."""
    twin = copy.deepcopy(D)
    for parent in twin.modules():
        for name, child in parent.named_children():
            if isinstance(child, ops.BatchNormAct2d):
                bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
                bn.load_state_dict(nn.BatchNorm2d.state_dict(child))
                setattr(parent, name, nn.Sequential(bn, nn.LeakyReLU(child.negative_slope)))
    return twin


@pytest.mark.parametrize("net, shape", [("D_E", (5, 64, 4, 4)), ("D_R", (5, 3, 64, 64))])
def test_r1_through_batchnorm_discriminators_matches_stock_modules(net, shape):
    """The paper's BatchNorm discriminators: the penalty and every weight gradient of it agree with
    the same D built from stock modules, with D's BatchNorms on the fused cpp kernels (their
    double backward: ops/library.py), which the pass must really use."""
    torch.manual_seed(4)
    cfg = tiny_config()
    D = build_nets(cfg.model)[net].train()
    twin = _plain_twin(D)
    real = torch.randn(*shape)
    with ops.use_backend("cpp"), count_fused_forwards() as fused:
        logits, penalty = losses.r1_penalty(D, real)
        penalty.backward()
    assert fused.calls == sum(isinstance(m, ops.BatchNormAct2d) for m in D.modules()) > 0
    want_logits, want_penalty = losses.r1_penalty(twin, real)
    want_penalty.backward()
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(penalty, want_penalty, rtol=1e-5, atol=0)
    assert penalty > 0
    for (name, p), q in zip(D.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_r1_flattens_the_discriminator_at_real_inputs(image_folder):
    """The same D_E steps from the same start, with and without R1: with it, D_E's input gradient at
    real embeddings ends far smaller; the D loss reported includes the penalty."""
    ends, firsts = {}, {}
    for gamma in (0.0, 10.0):
        cfg, nets, opts, batch, emb = _setup("embed", image_folder)
        D, e_real = nets["D_E"], emb.of(batch)
        e_fake = nets["G_E"](sample_z(4, cfg.model.z_dim, torch.Generator().manual_seed(1))).detach()
        start = losses.r1_penalty(copy.deepcopy(D), e_real)[1].item()
        with ops.use_backend("cpp"):
            d = [_d_step(D, opts["D_E"], "bce", e_real, e_fake, gamma) for _ in range(15)]
        ends[gamma], firsts[gamma] = losses.r1_penalty(D, e_real)[1].item(), (d[0].item(), start)
        assert torch.isfinite(torch.stack(d)).all()
    assert ends[10.0] < 0.5 * ends[0.0], ends
    # Same start: the first reported loss differs by exactly γ/2 × the starting penalty.
    (plain, p0), (with_r1, p10) = firsts[0.0], firsts[10.0]
    assert p0 == pytest.approx(p10, rel=1e-6) and p0 > 0
    assert with_r1 - plain == pytest.approx(5.0 * p0, rel=1e-4), firsts


def test_lazy_r1_weighs_every_nth_step_by_n():
    cfg = tiny_config(r1_gamma={"D_E": 1.0, "D_R": 0.0}, r1_every=4)
    weights = [lazy_r1(cfg, i) for i in range(9)]
    assert weights == [{"D_E": 4.0}, {}, {}, {}, {"D_E": 4.0}, {}, {}, {}, {"D_E": 4.0}]
    cfg.r1_every = 1
    assert all(lazy_r1(cfg, i) == {"D_E": 1.0} for i in range(3))


def test_old_configs_keep_r1_on_every_step():
    """Runs saved before lazy R1 took the penalty every step: resumed, they still do."""
    saved = tiny_config(r1_gamma={"D_R": 1.0}).to_dict()
    del saved["r1_every"]
    assert TrainConfig.from_dict(saved).r1_every == 1
    assert TrainConfig().r1_every == 16


@pytest.mark.parametrize("stage", ["embed", "finetune"])
def test_the_trainer_step_takes_r1_on_the_scheduled_steps_only_at_n_times_gamma(stage, image_folder, monkeypatch):
    """Through take_step, as the trainer calls it: with r1_every=3 each discriminator's update gets
    3γ on the stage's steps 0 and 3 (by its image counter) and 0 on the others, and the penalty's
    double backward runs on those steps only."""
    import aegan_fast.training.stages as stages_mod
    cfg = tiny_config(precision="fp32", seed=0, r1_gamma={"D_E": 2.0, "D_R": 0.5}, r1_every=3)
    cfg.model.denoiser = True
    st = new_state(cfg, load_folder(image_folder, 64), "cpu", guard=False)
    emb = enter_stage(STAGES[stage], st)
    idx, mirror = torch.arange(4), torch.tensor([False, True, False, True])
    batch = st.batch(st.data.gather(idx, mirror, "cpu"), idx, mirror)
    names = {id(st.nets[k]): k for k in ("D_E", "D_R")}
    given, penalised = [], []
    real_d_step, real_penalty = stages_mod._d_step, losses.r1_penalty

    def d_step(D, opt, kind, real, fake, r1_gamma=0.0):
        given.append((st.counters["stage_img"] // cfg.batch, names[id(D)], r1_gamma))
        return real_d_step(D, opt, kind, real, fake, r1_gamma)

    def penalty(D, real):
        penalised.append((st.counters["stage_img"] // cfg.batch, names[id(D)]))
        return real_penalty(D, real)

    monkeypatch.setattr(stages_mod, "_d_step", d_step)
    monkeypatch.setattr(losses, "r1_penalty", penalty)
    for _ in range(5):
        logged = take_step(STAGES[stage], st, batch, emb)
        assert all(torch.isfinite(v) for v in logged.values())
        st.counters["stage_img"] += cfg.batch
    want = {"D_E": 6.0, "D_R": 1.5}
    assert given == [(i, name, want[name] if i % 3 == 0 else 0.0) for i in range(5) for name in ("D_E", "D_R")]
    assert penalised == [(i, name) for i in (0, 3) for name in ("D_E", "D_R")]


def test_stage_3_reuses_stage_2s_real_embeddings_until_h_is_written(image_folder):
    """H is frozen in stages 2 and 3, so stage 3 takes stage 2's table of H(x) instead of encoding
    every image again; a write to H (a rollback's load, here one weight nudged in place) encodes
    afresh. Each table is checked against H run now on the images it claims to hold."""
    cfg = tiny_config(precision="fp32", seed=0, embed_cache_mb=1e9)
    st = new_state(cfg, load_folder(image_folder, 64), "cpu", guard=False)
    idx, mirror = torch.tensor([0, 3, 1]), torch.tensor([False, True, True])

    def encoded_now():
        with torch.no_grad():
            return st.nets["H"](st.data.gather(idx, mirror, "cpu"))

    def lookup(emb):
        return emb.of(st.batch(st.data.gather(idx, mirror, "cpu"), idx, mirror))

    stage_2 = enter_stage(STAGES["embed"], st)
    torch.testing.assert_close(lookup(stage_2), encoded_now(), rtol=1e-5, atol=1e-6)
    stage_3 = enter_stage(STAGES["finetune"], st)
    assert stage_3 is stage_2
    with torch.no_grad():
        next(st.nets["H"].parameters()).mul_(1.5)
    again = enter_stage(STAGES["finetune"], st)
    assert again is not stage_2
    torch.testing.assert_close(lookup(again), encoded_now(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(lookup(again), lookup(stage_2))
