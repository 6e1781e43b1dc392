"""A few steps of each stage on a tiny fixed batch lower that stage's objective."""
import torch

from aegan_fast.data import load_folder
from aegan_fast.models import build_nets
from aegan_fast.stages import STEPS, Batch, RealEmbeddings, direct_gan_step, prepare_stage, start_stage
from aegan_fast.train import make_optimizers
from conftest import tiny_config


def _setup(stage, image_folder, cache_mb=1e9, denoiser=True, **overrides):
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    cfg.model.denoiser = denoiser
    data = load_folder(image_folder, 64)
    nets = build_nets(cfg.model)
    opts = make_optimizers(nets, cfg)
    if stage == "direct":
        nets.train()
    else:
        prepare_stage(stage, nets, opts, cfg)
    gen = torch.Generator().manual_seed(0)
    emb = None if stage in ("ae", "direct") else RealEmbeddings(nets["H"], data, gen, "cpu", 64 * 16, cache_mb * 2**20)
    idx, mirror = torch.arange(4), torch.tensor([False, True, False, True])
    return cfg, nets, opts, Batch(data.gather(idx, mirror, "cpu"), idx, mirror), emb


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
    parts = [{k: v.item() for k, v in direct_gan_step(nets, opts, batch, None, cfg).items()} for _ in range(15)]
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
    assert all(p["phi_l1"] == 0 for p in parts)  # φ is the identity: its output is its input


def test_stage_3_starts_f_with_fresh_adam_moments(image_folder):
    """F's moments from stage 1 would scale its first stage-3 updates by their stale, tiny second
    moments; cleared, Adam's first step moves no weight by more than the learning rate."""
    cfg, nets, opts, batch, _ = _setup("ae", image_folder)
    for _ in range(5):
        STEPS["ae"](nets, opts, batch, None, cfg)
    prepare_stage("finetune", nets, opts, cfg)
    emb = RealEmbeddings(nets["H"], load_folder(image_folder, 64), torch.Generator().manual_seed(0), "cpu",
                         64 * 16, max_bytes=0)
    h_state = {id(p): v["exp_avg_sq"].clone() for p, v in opts["H"].state.items()}
    start_stage("finetune", opts)
    assert not opts["F"].state and len(opts["H"].state) == len(h_state)  # only F's are cleared
    before = [p.detach().clone() for p in nets["F"].parameters()]
    STEPS["finetune"](nets, opts, batch, emb, cfg)
    lr = cfg.lr["F"] * cfg.finetune_lr_scale
    largest = max((p.detach() - b).abs().max().item() for p, b in zip(nets["F"].parameters(), before))
    assert 0 < largest <= lr * 1.001, (largest, lr)
