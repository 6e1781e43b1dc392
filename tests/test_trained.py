"""What people do with a trained model (issue 25): truncation, interpolation, real images in and out,
projection, the video writers, the Python API and its CLIs.

Every number is judged against a stock-torch reference of the lively checkpoint's nets, rebuilt from
scratch (aegan_fast.testing: plain_twin in float64), never against the code under test."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import aegan_fast
from aegan_fast import interpolation
from aegan_fast.config import TrainConfig
from aegan_fast.data import load_folder, read_images, to_float, to_uint8
from aegan_fast.decode import main as decode_main
from aegan_fast.encode import main as encode_main
from aegan_fast.errors import UserError
from aegan_fast.interpolate import main as interpolate_main
from aegan_fast.models import ModelConfig, build_nets, per_seed_z, truncate
from aegan_fast.project import main as project_main
from aegan_fast.reconstruct import main as reconstruct_main
from aegan_fast.sample import main as sample_main
from aegan_fast.testing import FP32_CHAIN, lively_weights, plain_twin
from aegan_fast.trained import Projection, TrainedModel
from aegan_fast.video import FrameWriter, check_output, video_writer

TINY = dict(resolution=64, ae_channels=16, ge_base_channels=32, max_channels=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = TrainConfig(model=ModelConfig(**TINY), device="cpu")
    nets = lively_weights(build_nets(cfg.model)).eval()
    path = tmp_path_factory.mktemp("trained") / "lively.pt"
    torch.save({"config": cfg.to_dict(), "nets": nets.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ref():
    """The checkpoint's nets rebuilt from scratch, stock torch, float64: H, F, G_E, phi as functions
    float32 → float32."""
    twin = plain_twin(lively_weights(build_nets(ModelConfig(**TINY))).eval()).double()
    return {k: (lambda x, m=twin[k]: m(x.double()).float()) for k in ("H", "F", "G_E", "phi")}


@pytest.fixture(scope="module")
def model(ckpt):
    return aegan_fast.load(ckpt, "cpu", backend="torch")


def close(got, want, atol=FP32_CHAIN):
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


def photo(path, size=(96, 72), seed=0):
    """A non-square photo-like image: smooth colour ramps plus noise, with a red left edge that the
    centre crop must cut away."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1) + rng.integers(0, 40, (h, w, 3))
    img[:, :8] = (255, 0, 0)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path


# ---- truncation ---------------------------------------------------------------------------------

def test_truncation_pulls_z_toward_its_mean_on_the_sampler(model, ref):
    z = per_seed_z([3, 4, 5], 100)
    close(truncate(z, 0.6), 0.6 * z, atol=0)
    assert truncate(z, 1.0) is z
    want = ref["phi"](ref["F"](ref["G_E"](0.6 * z)))
    close(model.sample(seeds=[3, 4, 5], truncation=0.6), want)
    assert (model.sample(seeds=[3], truncation=0.6) - model.sample(seeds=[3])).abs().max() > 1e-3
    psi0 = model.sample(seeds=[1, 2], truncation=0.0)
    close(psi0[0], psi0[1], atol=0)  # ψ = 0: every seed is the mean image
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(UserError, match="truncation"):
            truncate(z, bad)


def test_sample_and_eval_clis_take_truncation(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample_main(["--ckpt", str(ckpt), "--backend", "torch", "--seeds", "1", "--truncation", "1.2",
                     "--out", str(tmp_path / "g.png")])
    assert e.value.code == 2 and "truncation" in capsys.readouterr().err
    sample_main(["--ckpt", str(ckpt), "--backend", "torch", "--seeds", "0-3", "--truncation", "0",
                 "--out", str(tmp_path / "g.png")])
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert np.array_equal(grid[2:66, 2:66], grid[2:66, 68:132])  # ψ = 0: the same image in every cell


# ---- interpolation maths -----------------------------------------------------------------------

def test_lerp_and_slerp_paths():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    keys = torch.stack([a, b, -a])
    walk = interpolation.path(keys, 4, "lerp")
    assert walk.shape == (2 * 4 + 1, 2)
    close(walk[0], a, atol=0), close(walk[4], b, atol=0), close(walk[-1], -a, atol=0)
    close(walk[2], (a + b) / 2, atol=1e-7)
    looped = interpolation.path(keys, 4, "lerp", loop=True)
    assert looped.shape == (3 * 4, 2) and torch.equal(looped[:9], walk)
    s = interpolation.path(keys[:2], 4, "slerp")
    close(s[2], (a + b) / math.sqrt(2), atol=1e-6)  # the midpoint of a quarter circle
    close(s.norm(dim=1), torch.ones(5), atol=1e-6)  # slerp keeps the norm, lerp sags
    assert walk[2].norm() < 0.75
    close(interpolation.slerp(a, 2 * a, torch.tensor([0.5]))[0], 1.5 * a, atol=1e-6)  # parallel: lerp
    for args, message in (((keys[:1], 4), "two keyframes"), ((keys, 0), "frames"), ((keys, 4, "cubic"), "method")):
        with pytest.raises(UserError, match=message):
            interpolation.path(*args)


def test_interpolating_seeds_in_z_and_in_the_embedding(model, ref):
    z = per_seed_z([1, 2], 100)
    walk = model.interpolate([1, 2], frames=4)  # auto: z space, slerp
    assert walk.shape == (5, 3, 64, 64)
    chain = lambda v: ref["phi"](ref["F"](ref["G_E"](v)))  # noqa: E731
    close(walk[0], chain(z[:1])[0]), close(walk[-1], chain(z[1:])[0])
    mid = interpolation.slerp(z[0], z[1], torch.tensor([0.5])).clamp(-1, 1)
    close(walk[2], chain(mid)[0])
    lerped = model.interpolate([1, 2], frames=4, method="lerp")
    close(lerped[2], chain((z[:1] + z[1:]) / 2)[0])
    emb = model.interpolate([1, 2], frames=4, space="embedding")
    e = ref["G_E"](z)
    close(emb[2], ref["phi"](ref["F"]((e[:1] + e[1:]) / 2))[0])
    close(emb[0], walk[0])
    close(model.interpolate([1, 2], frames=2, truncation=0.5)[0], chain(0.5 * z[:1])[0])
    with pytest.raises(UserError, match="truncation applies to z"):
        model.interpolate([1, 2], space="embedding", truncation=0.5)
    with pytest.raises(UserError, match="space"):
        model.interpolate([1, 2], space="pixels")


# ---- real images -----------------------------------------------------------------------------

def test_images_are_prepared_exactly_as_training_prepares_a_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "wide.png"), photo(folder / "tall.jpg", (60, 90), seed=1)
    prepared = load_folder(folder, 64, progress=False)
    read = read_images([folder / "tall.jpg", folder / "wide.png"], 64)
    assert read.failed == [] and read.names == [str(folder / "tall.jpg"), str(folder / "wide.png")]
    by_name = {n: i for i, n in enumerate(read.names)}
    order = sorted(read.names)  # prepare's order: the sorted listing
    assert torch.equal(read.images[[by_name[n] for n in order]], prepared.images)
    assert (read.images[by_name[str(folder / "wide.png")]][0, :, :4] < 250).any()  # the red edge is cut away


def test_bad_files_are_named_and_the_rest_still_load(tmp_path):
    good = photo(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    read = read_images([good, tmp_path / "notes.png", tmp_path / "missing.jpg", tmp_path / "empty"], 64)
    assert read.names == [str(good)] and read.images.shape == (1, 3, 64, 64)
    reasons = dict(read.failed)
    assert "not a decodable image" in reasons[str(tmp_path / "notes.png")]
    assert reasons[str(tmp_path / "missing.jpg")] == "no such file"
    assert "no image files" in reasons[str(tmp_path / "empty")]


def test_encode_decode_reconstruct_against_the_reference(model, ref, tmp_path):
    x = to_float(read_images([photo(tmp_path / "a.png"), photo(tmp_path / "b.png", seed=3)], 64).images)
    e = model.encode(x)
    assert e.shape == (2, *model.embedding_shape)
    close(e, ref["H"](x))
    close(model.decode(e), ref["phi"](ref["F"](e)))
    close(model.decode(e, denoise=False), ref["F"](e))
    close(model.encode(tmp_path / "a.png"), e[:1])  # a path goes through the same preparation
    close(model.encode(Image.open(tmp_path / "a.png")), e[:1])
    rec = model.reconstruct(x)
    want = ref["phi"](ref["F"](ref["H"](x)))
    close(rec.output, want)
    mse = (want.double() - x.double()).pow(2).flatten(1).mean(1)
    np.testing.assert_allclose(rec.psnr, (10 * torch.log10(4 / mse)).tolist(), rtol=1e-4)
    pils = model.decode(e, pil=True)
    assert len(pils) == 2 and np.array_equal(np.asarray(pils[1]), to_uint8(rec.output[1]).permute(1, 2, 0).numpy())
    with pytest.raises(UserError, match="notes.png"):
        (tmp_path / "notes.png").write_text("x")
        model.encode([tmp_path / "a.png", tmp_path / "notes.png"])
    with pytest.raises(UserError, match="embeddings must be"):
        model.decode(torch.zeros(1, 64, 8, 8))
    with pytest.raises(UserError, match="expected 3×64×64"):
        model.encode(torch.zeros(1, 3, 32, 32))


def test_real_images_interpolate_in_the_embedding_and_with_seeds(model, ref, tmp_path):
    a, b = photo(tmp_path / "a.png"), photo(tmp_path / "b.png", seed=3)
    x = to_float(read_images([a, b], 64).images)
    h = ref["H"](x)
    walk = model.interpolate([a, b], frames=4)  # auto: the embedding, lerp
    close(walk[0], ref["phi"](ref["F"](h[:1]))[0])
    close(walk[3], ref["phi"](ref["F"](h[:1] + 0.75 * (h[1:] - h[:1])))[0])
    mixed = model.interpolate([a, 7], frames=2)
    close(mixed[-1], ref["phi"](ref["F"](ref["G_E"](per_seed_z([7], 100))))[0])


def test_project_finds_the_z_of_a_generated_image(model, ref):
    z_true = per_seed_z([11], 100)
    x = ref["phi"](ref["F"](ref["G_E"](z_true)))
    fit = model.project(x[0], steps=150, restarts=4, seed=100)
    assert isinstance(fit, Projection) and fit.z.shape == (1, 100) and len(fit.loss) == 150
    assert fit.z.abs().max() <= 1
    target = ref["H"](x)
    start = (ref["G_E"](per_seed_z(range(100, 104), 100)) - target).pow(2).flatten(1).mean(1).min()
    final = (ref["G_E"](fit.z) - target).pow(2).mean()
    np.testing.assert_allclose(fit.final_loss, final.item(), rtol=1e-3)
    assert final < 0.7 * start, (start, final)  # lively nets: H(x) need not lie in G_E's range; 0.54 measured
    again = model.project(x[0], steps=150, restarts=4, seed=100)
    close(again.z, fit.z, atol=0)  # seeded: the same answer twice
    walk = model.interpolate([fit, 11], frames=2)  # a projection is a z keyframe
    close(walk[0], ref["phi"](ref["F"](ref["G_E"](fit.z)))[0])
    with pytest.raises(UserError, match="steps"):
        model.project(x[0], steps=0)


# ---- video ------------------------------------------------------------------------------------

def frames(n=5, size=32):
    t = torch.linspace(0, 255, n).round().to(torch.uint8)
    return t[:, None, None, None].expand(n, 3, size, size).contiguous()


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_pillow_animations_hold_every_frame(tmp_path, suffix):
    out = tmp_path / f"walk{suffix}"
    with FrameWriter(out, fps=10) as w:
        w.append(frames()[:2]), w.append(frames()[2:])
    with Image.open(out) as im:
        assert im.n_frames == 5 and im.size == (32, 32)
        im.seek(4)
        assert abs(int(np.asarray(im.convert("RGB"))[0, 0, 0]) - 255) <= 2
    assert list(tmp_path.iterdir()) == [out]


def test_png_grid_has_a_row_per_segment(tmp_path):
    with FrameWriter(tmp_path / "walk.png", nrow=3) as w:
        w.append(frames(6))
    assert Image.open(tmp_path / "walk.png").size == (3 * 34 + 2, 2 * 34 + 2)


@pytest.mark.skipif(video_writer() is None, reason="no video library (imageio + imageio-ffmpeg, or av) installed")
def test_mp4_is_written_and_reads_back(tmp_path):
    import imageio.v3 as iio
    out = tmp_path / "walk.mp4"
    with FrameWriter(out, fps=12) as w:
        w.append(frames(7, 64))
    got = iio.imread(out, plugin="pyav") if video_writer() == "pyav" else np.stack(list(iio.imiter(out)))
    assert got.shape == (7, 64, 64, 3)
    assert abs(int(got[-1].mean()) - 255) <= 3 and int(got[0].mean()) <= 3


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="give a video"):
        check_output(tmp_path / "walk.avi2")
    import aegan_fast.video as video
    monkeypatch.setattr(video, "video_writer", lambda: None)
    with pytest.raises(UserError, match="pip install imageio imageio-ffmpeg"):
        check_output(tmp_path / "walk.mp4")
    with pytest.raises(RuntimeError, match="boom"), FrameWriter(tmp_path / "walk.gif") as w:
        w.append(frames())
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


# ---- the CLIs ---------------------------------------------------------------------------------

def run_cli(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr()


def test_interpolate_cli_writes_every_frame_and_refuses_bad_input(ckpt, tmp_path, capsys):
    out = tmp_path / "walk.gif"
    interpolate_main(["--ckpt", str(ckpt), "--backend", "torch", "--seeds", "1,7,42", "--frames", "3", "--out", str(out)])
    with Image.open(out) as im:
        assert im.n_frames == 2 * 3 + 1
    assert "7 frames (z space" in capsys.readouterr().out
    for argv, message in ((["--seeds", "1", "--out", "w.gif"], "at least two keyframes"),
                          (["--seeds", "1,2", "--out", "w.avi2"], "give a video"),
                          (["--seeds", "1,2", "--keys", "3", "4", "--out", "w.gif"], "drop --seeds"),
                          (["--keys", "1", "nope.jpg", "--out", "w.gif"], "neither a seed"),
                          (["--seeds", "1-x", "--out", "w.gif"], "not a seed")):
        code, cap = run_cli(interpolate_main, ["--ckpt", str(ckpt), *argv], capsys)
        assert code == 2 and message in cap.err and "Traceback" not in cap.err, (argv, cap.err)
    code, cap = run_cli(interpolate_main, ["--ckpt", str(tmp_path / "nope"), "--seeds", "1,2", "--out",
                                           str(tmp_path / "w.gif")], capsys)
    assert code == 2 and not (tmp_path / "w.gif").exists()


def test_encode_then_decode_round_trips_and_bad_files_exit_2(ckpt, model, tmp_path, capsys):
    a, b = photo(tmp_path / "a.png"), photo(tmp_path / "b.png", seed=3)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    npz = tmp_path / "emb.npz"
    code, cap = run_cli(encode_main, ["--ckpt", str(ckpt), str(a), str(tmp_path / "bad.jpg"), str(b),
                                      "--out", str(npz)], capsys)
    assert code == 2 and "bad.jpg" in cap.err and "1 of 3 files" in cap.err
    with np.load(npz) as f:
        emb = torch.from_numpy(f["embeddings"])
        assert [str(n) for n in f["names"]] == [str(a), str(b)]
    close(emb, model.encode([a, b]), atol=0)
    decode_main(["--ckpt", str(ckpt), str(npz), "--out", f"{tmp_path / 'out'}/"])
    png = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / "b.png"))).permute(2, 0, 1)
    assert (png.int() - to_uint8(model.decode(emb[1:]))[0].int()).abs().max() <= 1
    code, cap = run_cli(decode_main, ["--ckpt", str(ckpt), str(tmp_path / "bad.jpg"), "--out", str(tmp_path / "g.png")],
                        capsys)
    assert code == 2 and "not an .npz" in cap.err
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "sampler.onnx").write_bytes(b"not a model")
    for bad, message in (("garbage.pt", "corrupt"), ("sampler.onnx", "only the sampling chain"), ("none", "no run")):
        code, cap = run_cli(encode_main, ["--ckpt", str(tmp_path / bad), str(a), "--out", str(tmp_path / "e.npz")], capsys)
        assert code == 2 and message in cap.err and "Traceback" not in cap.err, (bad, cap.err)


def test_reconstruct_cli_sheet_and_psnr_table(ckpt, model, tmp_path, capsys):
    a, b = photo(tmp_path / "a.png"), photo(tmp_path / "b.png", seed=3)
    reconstruct_main(["--ckpt", str(ckpt), str(a), str(b), "--out", str(tmp_path / "sheet.png")])
    out = capsys.readouterr().out
    rec = model.reconstruct([a, b])
    assert f"{rec.psnr[1]:7.2f}" in out and "mean" in out
    assert Image.open(tmp_path / "sheet.png").size == (3 * 66 + 2, 2 * 66 + 2)  # x | F(H(x)) | φ, a row each


def test_project_cli_writes_z_pictures_and_a_keyframe(ckpt, model, tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(to_uint8(model.sample(seeds=[5]))[0].permute(1, 2, 0).numpy()).save(image)
    npz = tmp_path / "proj.npz"
    project_main(["--ckpt", str(ckpt), str(image), "--steps", "40", "--restarts", "2", "--out", str(npz)])
    assert "embedding distance" in capsys.readouterr().out
    assert (tmp_path / "proj.png").is_file() and (tmp_path / "proj-loss.png").is_file()
    with np.load(npz) as f:
        z, loss = torch.from_numpy(f["z"]), f["loss"]
    assert z.shape == (1, 100) and len(loss) == 40 and loss[-1] < loss[0]
    interpolate_main(["--ckpt", str(ckpt), "--backend", "torch", "--keys", str(npz), "3", "--frames", "2",
                      "--out", str(tmp_path / "w.png")])
    decode_main(["--ckpt", str(ckpt), str(npz), "--out", f"{tmp_path / 'dz'}/"])
    png = torch.from_numpy(np.asarray(Image.open(next((tmp_path / "dz").iterdir())))).permute(2, 0, 1)
    assert (png.int() - to_uint8(model.sample_z(z))[0].int()).abs().max() <= 1


def test_load_is_the_package_api(ckpt):
    m = aegan_fast.load(ckpt, "cpu", backend="torch")
    assert isinstance(m, TrainedModel) and m.resolution == 64 and m.embedding_shape == (64, 4, 4)
    images = m.sample(seeds=[0, 1], pil=True)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    with pytest.raises(UserError, match="seeds"):
        m.sample()


def test_the_readme_example_runs_as_written(ckpt, tmp_path, monkeypatch):
    """The "From Python" block of README's "Using a trained model", run on the lively checkpoint (on
    the torch sampler: auto would export to OpenVINO first, which test_openvino covers)."""
    from pathlib import Path
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Using a trained model", 1)[1].split("\n## ", 1)[0]
    code = section.split("**From Python**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "aegan_fast.load(RUN)" in code
    monkeypatch.chdir(tmp_path)
    photo(tmp_path / "photo.png")
    scope = {"RUN": str(ckpt)}
    exec(compile(code.replace("aegan_fast.load(RUN)", "aegan_fast.load(RUN, backend='torch')"), "README", "exec"), scope)
    assert scope["grid"].shape == (16, 3, 64, 64) and len(scope["to_seed"]) == 9
    assert len(scope["fit"].loss) == 100 and scope["rec"].psnr
