"""Every net's output shape at every supported resolution, and the embedding's shape and range."""
import pytest
import torch
from torch import nn

from aegan_fast.models import ModelConfig, build_nets, SamplingChain, sample_z


@pytest.mark.parametrize("R", [64, 128, 256])
def test_shapes_train_mode(R):
    nets = build_nets(ModelConfig(resolution=R))
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


def test_denoiser_skips_and_own_batchnorms():
    cfg = ModelConfig(resolution=64, denoiser_skips=True)
    phi = build_nets(cfg)["phi"]
    assert phi(torch.zeros(2, 3, 64, 64)).shape == (2, 3, 64, 64)
    bns = [m for m in phi.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len({id(m) for m in bns}) and len(bns) >= 8


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
    from weights import lively_weights, plain_twin

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
    from weights import FP32_CHAIN, lively_weights, reference_chain

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
