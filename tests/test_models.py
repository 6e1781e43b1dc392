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
