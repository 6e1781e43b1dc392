"""Every net's output shape at every supported resolution, and the embedding's shape and range; the
up-sampling option (transposed conv or resize + conv)."""
import copy

import pytest
import torch
from torch import nn

from aegan_fast.models import ModelConfig, ResizeConv2d, SamplingChain, build_nets, sample_z


@pytest.mark.parametrize("R,upsample", [(64, "transposed"), (128, "transposed"), (256, "transposed"),
                                        (64, "resize_conv"), (128, "resize_conv")])
def test_shapes_train_mode(R, upsample):
    nets = build_nets(ModelConfig(resolution=R, upsample=upsample))
    x = torch.rand(2, 3, R, R) * 2 - 1
    e = nets["H"](x)
    assert e.shape == (2, 64, R // 16, R // 16)
    assert nets["F"](e).shape == (2, 3, R, R)
    e_fake = nets["G_E"](sample_z(2, 100))
    assert e_fake.shape == e.shape
    assert nets["D_E"](e_fake).shape == (2,)
    assert nets["phi"](x).shape == (2, 3, R, R)
    assert nets["D_R"](x).shape == (2,)


def test_shapes_512_forward_batch1():
    nets = build_nets(ModelConfig(resolution=512)).eval()
    with torch.no_grad():
        z = sample_z(1, 100)
        e = nets["G_E"](z)
        assert e.shape == (1, 64, 32, 32)  # 32×32×64: ~12× fewer values than the 512² image
        img = SamplingChain.of(nets)(z)
        assert img.shape == (1, 3, 512, 512)
        assert nets["H"](img).shape == (1, 64, 32, 32)
        assert nets["D_E"](e).shape == (1,)
        assert nets["D_R"](img).shape == (1,)


def test_embeddings_share_a_range():
    """The public code's H ends in LeakyReLU while G_E ends in tanh; ours both end in tanh."""
    nets = build_nets(ModelConfig(resolution=64))
    real = nets["H"](torch.rand(4, 3, 64, 64) * 20 - 10)
    fake = nets["G_E"](sample_z(4, 100))
    for e in (real, fake):
        assert e.abs().max() <= 1.0


def test_denoiser_is_an_encoder_decoder_without_skips_and_own_batchnorms():
    phi = build_nets(ModelConfig(resolution=64))["phi"].eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    chained = x
    for layer in [*phi.down, *phi.up]:  # each layer sees only the previous one's output
        chained = layer(chained)
    with torch.no_grad():
        assert torch.equal(phi(x), chained) and chained.shape == x.shape
    bns = [m for m in phi.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len({id(m) for m in bns}) and len(bns) >= 8


def test_the_retired_unet_option_is_a_clear_error_and_off_still_loads(tmp_path):
    from aegan_fast.training.run_state import load_sampling_nets
    from aegan_fast.config import TrainConfig
    from aegan_fast.errors import UserError
    saved = TrainConfig(model=ModelConfig(resolution=64)).to_dict()
    assert "denoiser_skips" not in saved["model"]
    old = copy.deepcopy(saved)
    old["model"]["denoiser_skips"] = False  # configs saved before the retirement carry the key
    assert TrainConfig.from_dict(old).to_dict() == saved
    old["model"]["denoiser_skips"] = True
    with pytest.raises(UserError, match=r"model\.denoiser_skips was retired: the U-Net φ .* collapsed in stage 3 "
                                        r"in every measured run \(bench/RESULTS\.md\)"):
        TrainConfig.from_dict(old)
    torch.save({"config": old, "nets": {}}, tmp_path / "unet.pt")
    with pytest.raises(UserError, match="retired"):
        load_sampling_nets(tmp_path / "unet.pt")


@pytest.mark.parametrize("R", [32, 96, 100, 0])
def test_bad_resolution(R):
    with pytest.raises(ValueError, match="power of two"):
        ModelConfig(resolution=R)


def test_init_is_dcgan_normal():
    nets = build_nets(ModelConfig(resolution=64))
    w = torch.cat([m.weight.flatten() for m in nets.modules() if isinstance(m, nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_resblock_folds_to_stock_modules(activation):
    """ResBlock.fold: stock modules only, the eval-mode block's output within 1e-5 (against a
    stock-torch twin, not the fused ops), the block itself left as it was."""
    from aegan_fast.models import FoldedResBlock, ResBlock
    from aegan_fast.ops import BatchNormAct2d, BatchNormAddAct2d
    from aegan_fast.testing import lively_weights, plain_twin

    block = lively_weights(ResBlock(8, activation, 0.1), seed=3)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    folded = block.fold()
    assert isinstance(folded, FoldedResBlock)
    assert not any(isinstance(m, (nn.BatchNorm2d, BatchNormAct2d, BatchNormAddAct2d)) for m in folded.modules())
    assert all(m.training for m in block.modules())
    assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        want = plain_twin(block).double()(x.double()).float()
        assert want.std() > 0.5
        torch.testing.assert_close(folded(x), want, rtol=0, atol=1e-5)


def test_sampling_chain_sample_is_seeded_and_chunked():
    """SamplingChain.sample(n, seed, batch): z ~ U(-1, 1) from a CPU generator seeded with seed,
    the same images whatever the chunk size, on the CPU."""
    from aegan_fast.testing import FP32_CHAIN, lively_weights, reference_chain

    nets = lively_weights(build_nets(ModelConfig(resolution=64, ae_channels=16, ge_base_channels=32,
                                                 max_channels=32))).eval()
    chain = SamplingChain.of(nets)
    z = torch.rand(5, 100, generator=torch.Generator().manual_seed(11)) * 2 - 1
    with torch.no_grad():
        want = reference_chain(nets)(z)
        want_no_phi = reference_chain(nets, denoise=False)(z[:2])
    got = chain.sample(5, seed=11, batch=2)
    assert got.device.type == "cpu" and got.shape == (5, 3, 64, 64) and want.std() > 0.15
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_CHAIN)
    torch.testing.assert_close(chain.sample(5, seed=11, batch=5), got, rtol=0, atol=FP32_CHAIN)
    assert not torch.allclose(chain.sample(5, seed=12), got, atol=0.1)
    no_phi = SamplingChain.of(nets, denoise=False)
    assert not no_phi.denoise
    torch.testing.assert_close(no_phi.sample(2, seed=11), want_no_phi, rtol=0, atol=FP32_CHAIN)
    assert (want_no_phi - want[:2]).abs().max() > 0.1  # φ is a real denoiser here: skipping it shows


# ---- upsampling: the paper's transposed conv, or resize + conv ------------------------------------

def _up_layers(net):
    """(stride-2 transposed convs, resize convs) in net."""
    return ([m for m in net.modules() if isinstance(m, nn.ConvTranspose2d) and m.stride == (2, 2)],
            [m for m in net.modules() if isinstance(m, ResizeConv2d)])


@pytest.mark.parametrize("R", [64, 128])
def test_upsample_option_reaches_every_up_layer(R):
    """Every ×2 up layer of G_E, F and φ follows the option: log2(R/16)-2 in G_E, four in F, log2(R)
    in φ. (G_E's first ConvTranspose, 1×1 → 4×4 at stride 1, is not an up-by-2 layer: it stays.)"""
    n_up = {"G_E": (R // 16).bit_length() - 3, "F": 4, "phi": R.bit_length() - 1}
    for kind in ("transposed", "resize_conv"):
        nets = build_nets(ModelConfig(resolution=R, upsample=kind))
        for name, n in n_up.items():
            transposed, resized = _up_layers(nets[name])
            assert (len(transposed), len(resized)) == ((n, 0) if kind == "transposed" else (0, n)), (kind, name)
        assert isinstance(nets["G_E"].net[0], nn.ConvTranspose2d)
        for name in ("H", "D_E", "D_R"):
            assert _up_layers(nets[name]) == ([], [])


def test_unknown_upsample_is_a_clear_error():
    with pytest.raises(ValueError, match="upsample must be one of transposed, resize_conv, got 'bilinear'"):
        ModelConfig(upsample="bilinear")
    cfg = ModelConfig()
    cfg.upsample = "nearest"  # changed after construction: still refused when the nets are built
    with pytest.raises(ValueError, match="upsample must be one of"):
        build_nets(cfg)


def _bn(prefix):
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


# The default nets' state-dict layout, captured from the code before the upsample option existed
# (2026-12-02): old checkpoints must keep loading. 4-D weights with their shapes (a ConvTranspose2d
# weight is in × out × 4 × 4), the fused BatchNorms' prefixes, and the remaining biases.
DEFAULT_LAYOUT = {
    ("G_E", 128): ({"net.0.weight": (100, 512, 4, 4), "net.2.conv1.weight": (512, 512, 3, 3),
                    "net.2.conv2.weight": (512, 512, 3, 3), "net.3.0.weight": (512, 256, 4, 4),
                    "net.4.conv1.weight": (256, 256, 3, 3), "net.4.conv2.weight": (256, 256, 3, 3),
                    "net.5.weight": (64, 256, 3, 3)},
                   ["net.1", "net.2.bn1", "net.2.bn2", "net.3.1", "net.4.bn1", "net.4.bn2"], ["net.5.bias"]),
    ("F", 64): ({"net.0.0.weight": (64, 64, 4, 4), "net.1.conv1.weight": (64, 64, 3, 3),
                 "net.1.conv2.weight": (64, 64, 3, 3), "net.2.0.weight": (64, 64, 4, 4),
                 "net.3.conv1.weight": (64, 64, 3, 3), "net.3.conv2.weight": (64, 64, 3, 3),
                 "net.4.0.weight": (64, 64, 4, 4), "net.5.conv1.weight": (64, 64, 3, 3),
                 "net.5.conv2.weight": (64, 64, 3, 3), "net.6.weight": (64, 3, 4, 4)},
                ["net.0.1", "net.1.bn1", "net.1.bn2", "net.2.1", "net.3.bn1", "net.3.bn2", "net.4.1", "net.5.bn1",
                 "net.5.bn2"], ["net.6.bias"]),
    ("phi", 64): ({"down.0.0.weight": (64, 3, 4, 4), "down.1.0.weight": (128, 64, 4, 4),
                   "down.2.0.weight": (256, 128, 4, 4), "down.3.0.weight": (512, 256, 4, 4),
                   "down.4.0.weight": (512, 512, 4, 4), "down.5.0.weight": (512, 512, 4, 4),
                   "up.0.0.weight": (512, 512, 4, 4), "up.1.0.weight": (512, 512, 4, 4),
                   "up.2.0.weight": (512, 256, 4, 4), "up.3.0.weight": (256, 128, 4, 4),
                   "up.4.0.weight": (128, 64, 4, 4), "up.5.0.weight": (64, 3, 4, 4)},
                  ["down.1.1", "down.2.1", "down.3.1", "down.4.1", "up.0.1", "up.1.1", "up.2.1", "up.3.1", "up.4.1"],
                  ["down.0.0.bias", "down.5.0.bias", "up.5.0.bias"]),
}


@pytest.mark.parametrize("net,R", list(DEFAULT_LAYOUT))
def test_default_state_dict_layout_unchanged(net, R):
    weights, bns, biases = DEFAULT_LAYOUT[net, R]
    want = {**weights, **{k: None for p in bns for k in _bn(p)}, **{k: None for k in biases}}
    got = build_nets(ModelConfig(resolution=R))[net].state_dict()
    assert sorted(got) == sorted(want)
    assert {k: tuple(v.shape) for k, v in got.items() if v.dim() == 4} == weights
    # resize_conv keeps the keys (the conv sits where the transposed conv sat) but not the shapes:
    # a checkpoint of one option is refused by the other's nets, never loaded into the wrong layers.
    other = build_nets(ModelConfig(resolution=R, upsample="resize_conv"))[net]
    assert sorted(other.state_dict()) == sorted(want)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(got)


def test_resize_conv_is_nearest_then_reflect_conv():
    """ResizeConv2d against the formula written out with stock functions."""
    conv = ResizeConv2d(5, 7)
    nn.init.normal_(conv.bias)
    x = torch.randn(2, 5, 3, 4)
    up = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    want = nn.functional.conv2d(nn.functional.pad(up, (1, 1, 1, 1), mode="reflect"), conv.weight, conv.bias)
    torch.testing.assert_close(conv(x), want, rtol=0, atol=1e-6)
    assert conv(x).shape == (2, 7, 6, 8)


def _spatial_spread(y):
    """Per image and channel, max |y − its spatial mean|: 0 for a flat map."""
    return (y - y.mean(dim=(2, 3), keepdim=True)).abs().amax()


@pytest.mark.parametrize("weights", ["constant", "random"])
def test_flat_input_stays_flat_through_resize_conv_not_transposed(weights):
    """No checkerboard: a constant input through an eval-mode up block (×2 layer + fused BN+ReLU) with
    constant or random weights gives a constant output with resize_conv, borders included (nearest
    copies, reflect padding repeats them). The transposed conv does not: with constant weights its
    border pixels sum fewer taps; with random weights its four output phases sum different taps, a
    period-2 dot pattern all over the map."""
    from aegan_fast.models import _up

    outputs = {}
    for kind in ("transposed", "resize_conv"):
        torch.manual_seed(0)
        block = _up(6, 8, kind).eval()
        with torch.no_grad():
            if weights == "constant":
                block[0].weight.fill_(0.1)
            block[1].running_mean.uniform_(-0.2, 0.2)
            block[1].bias.fill_(1.0)  # keeps the ReLU from zeroing whole channels
        x = torch.full((2, 6, 5, 5), 0.7)
        with torch.no_grad():
            y = block(x)
        assert y.shape == (2, 8, 10, 10) and y.abs().amin() > 0.05
        outputs[kind] = y
    assert _spatial_spread(outputs["resize_conv"]) < 1e-6
    assert _spatial_spread(outputs["transposed"]) > 0.02
    interior = outputs["transposed"][..., 2:-2, 2:-2]
    if weights == "random":
        assert _spatial_spread(interior) > 0.02
        torch.testing.assert_close(interior[..., :-2, :-2], interior[..., 2:, 2:])  # and it has period 2
    else:
        assert _spatial_spread(interior) < 1e-6  # balanced taps: the dots come from training, not the init


def test_flat_embedding_decodes_to_a_flat_image_with_resize_conv():
    """The whole decoder F (eval mode, weights that vary): resize_conv maps a flat embedding to a flat
    image; the paper's transposed convs print a pattern on it."""
    from aegan_fast.testing import lively_weights

    spread = {}
    for kind in ("transposed", "resize_conv"):
        nets = lively_weights(build_nets(ModelConfig(resolution=64, ae_channels=16, ge_base_channels=32,
                                                     max_channels=32, upsample=kind))).eval()
        with torch.no_grad():
            img = nets["F"](torch.full((1, 64, 4, 4), 0.3))
        assert (img.mean(dim=(2, 3)) - img.mean()).abs().max() > 1e-3  # channels differ: not a dead net
        spread[kind] = _spatial_spread(img)
    assert spread["resize_conv"] < 1e-5 and spread["transposed"] > 0.05


def test_gradients_flow_through_resize_conv():
    nets = build_nets(ModelConfig(resolution=64, ae_channels=16, ge_base_channels=32, max_channels=32,
                                  upsample="resize_conv"))
    z = sample_z(3, 100).requires_grad_()
    img = SamplingChain.of(nets)(z)
    (img.square().mean() + nets["F"](nets["H"](img.detach())).square().mean()).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for name in ("G_E", "F", "phi", "H"):
        for key, p in nets[name].named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (name, key)
    for m in (m for n in ("G_E", "F", "phi") for m in _up_layers(nets[n])[1]):
        assert m.weight.grad.abs().sum() > 0


def test_resize_conv_runs_in_bf16_channels_last():
    """Under the bf16 step's autocast, with prepare()'s channels_last weights: the phase form's pad
    stays bf16 channels_last (no fp32 round trip), nothing is resized, and F's image matches fp32."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from aegan_fast.precision import resolve

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            x = args[0]
            if isinstance(x, torch.Tensor) and x.dim() == 4:
                self.ops.append((str(func.overloadpacket), x.dtype, x.is_contiguous(memory_format=torch.channels_last)))
            return func(*args, **(kwargs or {}))

    p = resolve("bf16", None, torch.device("cpu"))
    cfg = ModelConfig(resolution=64, ae_channels=16, upsample="resize_conv")
    torch.manual_seed(0)
    F32 = build_nets(cfg)["F"]
    F16 = p.prepare(copy.deepcopy(F32))
    e = torch.rand(2, 64, 4, 4) * 2 - 1
    with torch.no_grad():
        want = F32(e)
        with Seen() as seen, p.autocast():
            got = F16(p.activations(e))
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    assert not [op for op, _, _ in seen.ops if "upsample_nearest" in op]  # ops/upsample.py: no ×2 copy
    pads = [(dt, cl) for op, dt, cl in seen.ops if "replication_pad" in op]
    assert len(pads) == 4 and pads == [(torch.bfloat16, True)] * 4
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


def test_resize_conv_chain_folds_and_exports():
    """BatchNorm folding (aegan_fast.export.fold) takes ResizeConv2d as the Conv2d it is: the folded
    chain holds no fused op and matches the stock-torch twin; and it exports to ONNX in the phase form
    (ops/upsample.py: no Resize node, an edge Pad per up layer) that ONNX Runtime runs to the same images."""
    from aegan_fast.export import fold_chain
    from aegan_fast.export.fold import uses_custom_ops
    from aegan_fast.testing import FP32_CHAIN, lively_weights, reference_chain

    nets = lively_weights(build_nets(ModelConfig(resolution=64, ae_channels=16, ge_base_channels=32,
                                                 max_channels=32, upsample="resize_conv"))).eval()
    chain = SamplingChain.of(nets)
    graph = fold_chain(chain)
    assert not uses_custom_ops(graph) and not any(isinstance(m, nn.BatchNorm2d) for m in graph.modules())
    assert len([m for m in graph.modules() if isinstance(m, ResizeConv2d)]) == 0 + 4 + 6  # G_E has no up layer at R=64
    z = sample_z(4, 100, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference_chain(nets)(z)
        assert want.std() > 0.15 and want.std(0).mean() > 0.1
        torch.testing.assert_close(graph(z), want, rtol=0, atol=FP32_CHAIN)

    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import tempfile
    from pathlib import Path
    from aegan_fast.export.onnx_export import export_onnx, validate_onnx
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(graph, Path(tmp) / "resize.onnx")
        kinds = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert "Resize" not in kinds and kinds.count("Pad") >= 10, kinds
        assert validate_onnx(path, chain) <= 1e-4


def test_upsample_is_a_flag_and_old_configs_read_as_transposed():
    """--model.upsample comes from the field (help = its comment); a saved config from before the
    field existed reads back as the paper's transposed conv."""
    import argparse

    from aegan_fast.config import TrainConfig, add_config_arguments, apply_overrides, config_overrides

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = apply_overrides(TrainConfig(), config_overrides(parser.parse_args(["--model.upsample", "resize_conv"])))
    assert cfg.model.upsample == "resize_conv"
    assert "beyond the paper" in " ".join(parser.format_help().split())
    saved = TrainConfig().to_dict()
    del saved["model"]["upsample"]
    assert TrainConfig.from_dict(saved).model.upsample == "transposed"
