"""The AEGAN family: autoencoder H/F, embedding generator G_E and discriminator D_E, denoiser φ and
image discriminator D_R, as in the authors' public code with its known defects fixed (below), for
any resolution R that is a power of two ≥ 64.

Every BatchNorm+activation and BatchNorm+residual-add goes through ``aegan_fast.ops`` (the
``BatchNormAct2d`` / ``BatchNormAddAct2d`` modules), so the kernel backend is swapped without
touching this file.

Fixes to the authors' public code (see README, "Differences from the public code"):
- H ends in tanh, like G_E, so real embeddings H(x) and fake ones G_E(z) live in the same range
  (the public H ends in LeakyReLU: D_E could tell them apart by range alone).
- φ has its own BatchNorm per layer (the public code reused one across layers).
- Stage-2 details (x̂ detached before φ, frozen autoencoder in eval mode) live in the trainer.

Shape changes that make the family work at every R down to 64 (the embedding is R/16 × R/16 × 64,
so 4×4×64 at R=64):
- G_E ends in a 3×3 conv to the embedding channels (+ tanh) instead of ending on its last up layer,
  so at R=64, where no up layer exists, it still has a BN+ReLU+residual body.
- D_E starts with two 3×3 stride-1 convs so it has a hidden body even on a 4×4 embedding.

Beyond the paper (an option; the paper's design stays the default): ``upsample="resize_conv"``
makes every ×2 up layer of G_E, F and φ a nearest-neighbour resize + 3×3 conv (``ResizeConv2d``)
instead of the 4×4 stride-2 ConvTranspose2d, whose uneven tap coverage prints a dot pattern.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as nnf
from tqdm import tqdm

from .errors import UserError
from .ops import BatchNormAct2d, BatchNormAddAct2d, block_kernel, resize_conv3x3, run_resblock, run_up_block

EMBED_DOWNSCALE = 16  # H: R -> R/16 with four stride-2 convs


@dataclass
class ModelConfig:
    resolution: int = 64
    z_dim: int = 100
    embed_channels: int = 64
    ae_channels: int = 64           # width of H and F (64 in the reference)
    ge_base_channels: int = 256     # G_E width at R=64; doubles per extra up layer
    embed_max_channels: int = 512   # cap on G_E and D_E widths (they work on R/16 maps: cheap)
    max_channels: int = 512         # cap on φ and D_R widths (they work on images: the bulk of the cost)
    denoiser: bool = True           # False: no φ (an identity), the sampling chain ends at F
    denoiser_dropout: float = 0.5
    # how every ×2 up layer of G_E, F and φ upsamples: transposed (the paper's 4×4 stride-2
    # ConvTranspose) or resize_conv (nearest ×2 + reflect-padded 3×3 conv, against the transposed
    # conv's dot pattern; beyond the paper, 2.25× the multiply-adds per layer)
    upsample: str = "transposed"

    def __post_init__(self):
        check_resolution(self.resolution)
        check_upsample(self.upsample)

    @property
    def embed_size(self) -> int:
        return self.resolution // EMBED_DOWNSCALE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A saved model config; retired options are an error when set, dropped when off."""
        d = dict(d)
        for name, why in RETIRED.items():
            if d.pop(name, False):
                raise UserError(f"model.{name} was retired: {why}; this config or checkpoint cannot be "
                                f"trained or sampled by this version")
        return cls(**d)


# Options older configs may carry: name -> why it went (off in an old config loads as if absent).
RETIRED = {"denoiser_skips": "the U-Net φ (skip connections in the denoiser) collapsed in stage 3 in every "
                             "measured run (bench/RESULTS.md)"}


def check_resolution(r: int) -> None:
    if not isinstance(r, int) or r < 64 or r & (r - 1):
        raise ValueError(f"resolution must be a power of two ≥ 64 (64, 128, 256, 512, ...), got {r}")


UPSAMPLE = ("transposed", "resize_conv")


def check_upsample(kind: str) -> None:
    if kind not in UPSAMPLE:
        raise ValueError(f"upsample must be one of {', '.join(UPSAMPLE)}, got {kind!r}")


def _log2(n: int) -> int:
    return int(round(math.log2(n)))


class ReflectConv2d(nn.Conv2d):
    """nn.Conv2d(padding_mode="reflect") whose padding keeps its input's dtype under autocast.
    CPU autocast lists reflection_pad2d among its fp32 ops: every bf16 activation would be copied to
    fp32 for the pad and back to bf16 for the convolution (two casts per conv, measured)."""

    def __init__(self, channels_in: int, channels_out: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__(channels_in, channels_out, kernel_size, stride, padding, padding_mode="reflect", bias=bias)

    def _conv_forward(self, input, weight, bias):
        if not torch.is_autocast_enabled(input.device.type):
            return super()._conv_forward(input, weight, bias)
        with torch.autocast(input.device.type, enabled=False):
            padded = nnf.pad(input, self._reversed_padding_repeated_twice, mode="reflect")
        return nnf.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)


class ResizeConv2d(ReflectConv2d):
    """Nearest-neighbour ×2, then a reflect-padded 3×3 conv (Odena et al. 2016, "Deconvolution and
    Checkerboard Artifacts"). Every output pixel sees its input through the same nine taps, so a flat
    input stays flat; a 4×4 stride-2 ConvTranspose2d gives each of its four output phases a different
    2×2 subset of its taps, and unless training balances them that prints a period-2 dot pattern.
    A Conv2d subclass, so init and BatchNorm folding treat it as the convolution it is."""

    def __init__(self, channels_in: int, channels_out: int, bias: bool = True):
        super().__init__(channels_in, channels_out, 3, 1, 1, bias=bias)

    def forward(self, x):
        # The same function as interpolate-then-conv, in 16 multiply-adds per input pixel instead of 36
        # (ops/upsample.py); the reference backend runs it the plain way.
        return resize_conv3x3(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return "nearest ×2, " + super().extra_repr()


def upsample_conv(cin: int, cout: int, kind: str, bias: bool = True) -> nn.Module:
    """A layer doubling the spatial size: ``kind`` is ModelConfig.upsample."""
    check_upsample(kind)
    if kind == "resize_conv":
        return ResizeConv2d(cin, cout, bias=bias)
    return nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=bias)


class ResBlock(nn.Module):
    """reflect-pad conv3×3 → BN → act → reflect-pad conv3×3 → BN, plus identity."""

    def __init__(self, channels: int, activation: str = "relu", negative_slope: float = 0.2):
        super().__init__()
        self.conv1 = ReflectConv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = BatchNormAct2d(channels, activation, negative_slope)
        self.conv2 = ReflectConv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = BatchNormAddAct2d(channels, "identity")

    def forward(self, x):
        kernel = block_kernel(x, self.bn1.activation, self.conv1.weight)
        if kernel is not None:  # the whole block as one op (ops/blocks.py); same parameters and buffers
            return run_resblock(kernel, x, self.conv1, self.bn1, self.conv2, self.bn2)
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), x)

    def fold(self) -> "FoldedResBlock":
        """This block in eval semantics as new stock modules, each BatchNorm folded into its conv (for
        inference graphs: aegan_fast.export.fold); the block itself is left as it is."""
        # BatchNorm*.fold puts the conv it is given in eval mode: hand it copies.
        return FoldedResBlock(self.bn1.fold(copy.deepcopy(self.conv1)), self.bn1.plain_activation(),
                              self.bn2.fold(copy.deepcopy(self.conv2)), self.bn2.plain_activation())


class FoldedResBlock(nn.Module):
    """A folded ResBlock: act2(conv2(act1(conv1(x))) + x), convs with the BatchNorms in their bias."""

    def __init__(self, conv1: nn.Module, act1: nn.Module, conv2: nn.Module, act2: nn.Module):
        super().__init__()
        self.conv1, self.act1, self.conv2, self.act2 = conv1, act1, conv2, act2

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))) + x)


def _down(cin, cout, norm: bool, activation="leaky_relu"):
    """conv 4×4 stride 2, then BN+act (or act alone)."""
    conv = nn.Conv2d(cin, cout, 4, 2, 1, bias=not norm)
    act = BatchNormAct2d(cout, activation, 0.2) if norm else (
        nn.LeakyReLU(0.2) if activation == "leaky_relu" else nn.ReLU())
    return nn.Sequential(conv, act)


class UpBlock(nn.Sequential):
    """``_up``'s Sequential(×2 up conv, BatchNormAct2d(relu)): state_dict keys 0.* and 1.* as a plain
    Sequential's. With the transposed conv and a fused-block kernel (ops.block_kernel) it runs as
    one op (ops/blocks.py); otherwise layer by layer."""

    def forward(self, x):
        conv, bn = self[0], self[1]
        if type(conv) is nn.ConvTranspose2d and conv.bias is None:
            kernel = block_kernel(x, bn.activation, conv.weight)
            if kernel is not None:
                return run_up_block(kernel, x, conv, bn)
        return super().forward(x)


def _up(cin, cout, kind: str):
    """×2 up (``upsample_conv``), then BN+ReLU."""
    return UpBlock(upsample_conv(cin, cout, kind, bias=False), BatchNormAct2d(cout, "relu"))


class Encoder(nn.Module):
    """H: image (3×R×R) → embedding (64 × R/16 × R/16) in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.ae_channels
        layers: list[nn.Module] = []
        cin = 3
        for _ in range(3):
            layers += [nn.Conv2d(cin, c, 4, 2, 1), nn.LeakyReLU(0.2), ResBlock(c, "leaky_relu", 0.2)]
            cin = c
        layers += [nn.Conv2d(c, cfg.embed_channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """F: embedding → image in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.ae_channels
        layers: list[nn.Module] = []
        cin = cfg.embed_channels
        for _ in range(3):
            layers += [_up(cin, c, cfg.upsample), ResBlock(c, "relu")]
            cin = c
        layers += [upsample_conv(c, 3, cfg.upsample), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, e):
        return self.net(e)


class EmbeddingGenerator(nn.Module):
    """G_E: z ∈ [-1, 1]^z_dim → embedding. ConvT to 4×4, then up layers doubling space and halving
    channels until R/16, each followed by BN+ReLU and a residual block; a 3×3 conv + tanh out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n_up = _log2(cfg.embed_size) - 2
        c = min(cfg.embed_max_channels, cfg.ge_base_channels * 2 ** n_up)
        layers: list[nn.Module] = [nn.ConvTranspose2d(cfg.z_dim, c, 4, 1, 0, bias=False),
                                   BatchNormAct2d(c, "relu"), ResBlock(c, "relu")]
        for _ in range(n_up):
            layers += [_up(c, c // 2, cfg.upsample), ResBlock(c // 2, "relu")]
            c //= 2
        layers += [nn.Conv2d(c, cfg.embed_channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.z_dim = cfg.z_dim

    def forward(self, z):
        return self.net(z.view(z.shape[0], self.z_dim, 1, 1))


class EmbeddingDiscriminator(nn.Module):
    """D_E: embedding → one logit. Two 3×3 stride-1 convs (so it has a hidden body even on the 4×4
    embedding of R=64, where a lone conv left it near chance and G_E without a signal), stride-2 4×4
    convs doubling channels down to 4×4, then a 4×4 conv to the logit."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = min(cfg.embed_max_channels, 128)
        c2 = min(cfg.embed_max_channels, 2 * c)
        layers: list[nn.Module] = [nn.Conv2d(cfg.embed_channels, c, 3, 1, 1), nn.LeakyReLU(0.2),
                                   nn.Conv2d(c, c2, 3, 1, 1, bias=False), BatchNormAct2d(c2, "leaky_relu", 0.2)]
        c = c2
        for _ in range(_log2(cfg.embed_size) - 2):
            cout = min(cfg.embed_max_channels, c * 2)
            layers.append(_down(c, cout, norm=True))
            c = cout
        layers.append(nn.Conv2d(c, 1, 4, 1, 0))
        self.net = nn.Sequential(*layers)

    def forward(self, e):
        return self.net(e).flatten()


def _denoiser_channels(depth: int, max_channels: int) -> list[int]:
    return [min(max_channels, 64 * 2 ** i) for i in range(depth)]


class Denoiser(nn.Module):
    """φ: image → image. log2(R) stride-2 convs down to 1×1 (BN+LeakyReLU(0.2); the first has no BN,
    the innermost ReLU and no BN, as in pix2pix), then as many ×2 up layers with BN+ReLU and dropout
    on the first three, tanh out; no skip connections, as in the paper."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        depth = _log2(cfg.resolution)
        ch = _denoiser_channels(depth, cfg.max_channels)
        self.down = nn.ModuleList()
        cin = 3
        for i, c in enumerate(ch):
            innermost = i == depth - 1
            self.down.append(_down(cin, c, norm=0 < i < depth - 1, activation="relu" if innermost else "leaky_relu"))
            cin = c
        self.up = nn.ModuleList()
        for j in range(depth):
            mirror = depth - 1 - j  # the down layer producing the same spatial size as this up's input
            cin = ch[mirror]
            if j == depth - 1:
                self.up.append(nn.Sequential(upsample_conv(cin, 3, cfg.upsample), nn.Tanh()))
            else:
                block = _up(cin, ch[mirror - 1], cfg.upsample)
                if j < 3 and cfg.denoiser_dropout > 0:
                    block.append(nn.Dropout(cfg.denoiser_dropout))
                self.up.append(block)

    def forward(self, x):
        for layer in self.down:
            x = layer(x)
        for layer in self.up:
            x = layer(x)
        return x


class ImageDiscriminator(nn.Module):
    """D_R: image → one logit. log2(R) stride-2 4×4 convs to 1×1 with BN+LeakyReLU(0.2) (none on the
    first), widths (…, 64, 64, 128, 256, 512, 512) counted from the deep end as in the reference."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        depth = _log2(cfg.resolution)
        hidden = depth - 1
        ch = [min(cfg.max_channels, 64 * 2 ** max(0, i - (hidden - 5))) for i in range(hidden)]
        layers: list[nn.Module] = []
        cin = 3
        for i, c in enumerate(ch):
            layers.append(_down(cin, c, norm=i > 0))
            cin = c
        layers.append(nn.Conv2d(cin, 1, 4, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()


class PatchDiscriminator(nn.Module):
    """D_AE: image → a map of logits, one per overlapping patch (PatchGAN, Isola et al. 2017; the
    judge VQGAN's autoencoder trains against). Three stride-2 4×4 convs with LeakyReLU(0.2), widths
    ae_channels/2 doubling (capped at max_channels), then a 3×3 conv to one logit per position: an
    (R/8)² map whose every logit sees a 38-pixel patch at any R, so it judges edges and texture, not
    composition. Every conv is spectrally normalised and nothing is a BatchNorm: its Lipschitz
    constant stays bounded (the autoencoder's adversarial gradient with it, under a fixed weight),
    it costs little, and one rank's batch never mixes into another's verdict.
    Only stage 1's adversarial term uses it (``build_nets(..., ae_discriminator=True)``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        c = max(8, cfg.ae_channels // 2)
        layers: list[nn.Module] = []
        cin = 3
        for i in range(3):
            cout = min(cfg.max_channels, c * 2 ** i)
            layers += [sn(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.2)]
            cin = cout
        layers.append(sn(nn.Conv2d(cin, 1, 3, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


SAMPLING_CHAIN = ("G_E", "F", "phi")


def init_weights(module: nn.Module) -> None:
    """N(0, 0.02) for convs (DCGAN/pix2pix convention); BN scale N(1, 0.02), shift 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_nets(cfg: ModelConfig, ae_discriminator: bool = False) -> nn.ModuleDict:
    """The six nets; ``ae_discriminator``: D_AE too (a run with stage 1's adversarial term)."""
    nets = nn.ModuleDict({
        "H": Encoder(cfg), "F": Decoder(cfg), "G_E": EmbeddingGenerator(cfg),
        "D_E": EmbeddingDiscriminator(cfg), "phi": Denoiser(cfg) if cfg.denoiser else nn.Identity(),
        "D_R": ImageDiscriminator(cfg),
    })
    init_weights(nets)
    if ae_discriminator:  # made after the others are drawn: their weights are the same with or without it
        nets["D_AE"] = PatchDiscriminator(cfg)  # spectral norm: torch's conv init, no N(0, 0.02)
    return nets


def sample_z(n: int, z_dim: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """z ~ U(-1, 1), as in the reference."""
    return (torch.rand(n, z_dim, generator=generator) * 2 - 1).to(device)


def seeded_z(n: int, z_dim: int, seed: int, device="cpu") -> torch.Tensor:
    """The z every sampler draws for ``seed``: from a CPU generator, so a seed names the same images
    on every device and backend."""
    return sample_z(n, z_dim, torch.Generator().manual_seed(seed), device)


def per_seed_z(seeds, z_dim: int, device="cpu") -> torch.Tensor:
    """One z per seed, each the first row of ``seeded_z`` for that seed: a seed names one image,
    whatever list it stands in, its place there and the batch it lands in."""
    return torch.cat([seeded_z(1, z_dim, s) for s in seeds]).to(device)


def truncate(z: torch.Tensor, psi: float) -> torch.Tensor:
    """The truncation trick for AEGAN's z ~ U(-1, 1): z pulled toward its mean, 0, by ``psi`` (1: as
    drawn; 0: every seed gives the mean image). A scaling, not a resampling: each seed keeps its
    direction, so seed s at ψ = 0.6 is a calmer version of the same image, and every backend agrees
    because they all take z. Trades diversity for typicality (bench/RESULTS.md has the measured curve)."""
    check_truncation(psi)
    return z if psi == 1 else z * psi


def check_truncation(psi) -> None:
    if isinstance(psi, bool) or not isinstance(psi, (int, float)) or not 0 <= psi <= 1:
        raise UserError(f"truncation ψ must be a number in [0, 1] (1: no truncation), got {psi!r}")


@torch.no_grad()
def run_in_chunks(run, z: torch.Tensor, batch: int = 64, progress: bool = False) -> torch.Tensor:
    """torch.cat of run(z chunk) over chunks of ``batch`` rows, each result moved to the CPU (so n
    images never need n images' worth of device memory)."""
    if batch < 1:
        raise ValueError(f"batch must be ≥ 1, got {batch}")
    chunks = range(0, len(z), batch)
    return torch.cat([run(z[i:i + batch]).cpu() for i in
                      tqdm(chunks, desc="sampling", unit="batch", disable=not progress or len(chunks) < 2)])


class SamplingChain(nn.Module):
    """The sampling chain z → G_E → F → φ: the one place it is composed.

    It holds the nets it is given (no copies): ``SamplingChain.of(nets)`` over a run's nets or its
    EMA nets, or over folded copies for inference (``aegan_fast.export.fold.fold_chain``, what the
    Sampler's torch/compile backends and ONNX export run). ``phi=None`` ends the chain at F
    (``denoise=False``, or a run without a denoiser). Training previews, EMA, eval, folding, the
    Sampler and export all run it."""

    def __init__(self, G_E: nn.Module, F: nn.Module, phi: nn.Module | None, z_dim: int):
        super().__init__()
        self.G_E, self.F, self.phi = G_E, F, phi
        self.z_dim = z_dim

    @classmethod
    def of(cls, nets, denoise: bool = True) -> "SamplingChain":
        """The chain over ``nets`` (a mapping with G_E, F and phi, e.g. ``build_nets``' ModuleDict)."""
        return cls(nets["G_E"], nets["F"], nets["phi"] if denoise else None, nets["G_E"].z_dim)

    @property
    def denoise(self) -> bool:
        return self.phi is not None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.F(self.G_E(z))
        return self.phi(x) if self.phi is not None else x

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, batch: int = 64, progress: bool = False,
               truncation: float = 1.0) -> torch.Tensor:
        """n images in [-1, 1] (N×3×R×R, on the CPU) from z drawn for ``seed`` exactly as the sample
        CLI draws it (``truncate``d by ψ = ``truncation``), run in chunks of ``batch`` on the chain's device."""
        return run_in_chunks(self, truncate(seeded_z(n, self.z_dim, seed, self.device), truncation), batch, progress)

    @property
    def device(self) -> torch.device:
        return next(self.G_E.parameters()).device
