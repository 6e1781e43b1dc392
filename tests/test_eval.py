"""The eval CLI on a tiny trained run: JSON out, a readable table, the real | samples | nearest
sheet, clear errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aegan_fast.checkpoint import resolve_checkpoint
from aegan_fast.training.run_state import load_sampling_nets
from aegan_fast.data import ImageSet, load_folder, open_prepared, prepare, to_uint8
from aegan_fast.eval import main as eval_main
from aegan_fast.models import SamplingChain
from aegan_fast.sheet import (GAP, PAD, PAD_VALUE, STATS_N, SheetResult, make_sheet, nearest_training_images,
                               write_sheet)
from aegan_fast.training import train
from aegan_fast.viz import make_grid
from conftest import make_image_folder, tiny_config


def test_eval_writes_json_and_table(tiny_run, tmp_path, capsys):
    run, images = tiny_run
    out = tmp_path / "eval.json"
    eval_main(["--ckpt", str(run), "--data", str(images), "--metrics", "swd,msssim,fid_efflite,kid_efflite,psnr,l1",
               "--n", "12", "--out", str(out)])
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert result["n"] == 12
    assert m["swd"] > 0 and {"swd_64", "swd_32", "swd_16"} <= set(m)
    assert 0 <= m["msssim"] <= 1 and m["fid_efflite"] > 0 and "kid_efflite_std" in m
    assert 0 < m["l1"] < 2 and 0 < m["psnr"] < 60
    table = capsys.readouterr().out
    assert "fid_efflite" in table and "lower" in table and str(out) in table


def test_eval_bad_metric_is_a_clear_error(tiny_run, capsys):
    run, images = tiny_run
    with pytest.raises(SystemExit) as e:
        eval_main(["--ckpt", str(run), "--data", str(images), "--metrics", "swd,fid"])
    assert e.value.code == 2 and "unknown metric" in capsys.readouterr().err


def _brute_force(queries, train, size=32):
    """Every query against every training image and its mirror, float64, all at once."""
    size = min(size, queries.shape[-1])  # reduced, never enlarged
    q = F.interpolate(queries.double(), size=(size, size), mode="area").flatten(1)
    t = F.interpolate(train.double() / 127.5 - 1, size=(size, size), mode="area")
    d = torch.stack([torch.cdist(q, v.flatten(1)) for v in (t, t.flip(-1))])  # 2 × N × M
    return d.amin(0), d.argmin(0)


def test_nearest_finds_a_planted_copy_whatever_the_chunk():
    g = torch.Generator().manual_seed(0)
    train_images = torch.randint(0, 256, (40, 3, 64, 64), generator=g, dtype=torch.uint8)
    queries = torch.rand(6, 3, 64, 64, generator=g) * 2 - 1
    queries[2] = train_images[29].float() / 127.5 - 1           # a copy
    queries[4] = train_images[11].flip(-1).float() / 127.5 - 1  # a mirrored copy: the trainer sees mirrors
    # ties: a duplicated image is found at its first index, a symmetric one unmirrored, in any chunking
    train_images[25] = train_images[5]
    queries[0] = train_images[5].float() / 127.5 - 1
    train_images[8, ..., 32:] = train_images[8, ..., :32].flip(-1)
    queries[1] = train_images[8].float() / 127.5 - 1
    d_all, _ = _brute_force(queries, train_images)
    expected = d_all.argmin(1)
    answers = [nearest_training_images(queries, train_images, chunk=c) for c in (1, 7, 40, 1000)]
    for dist, idx, mirrored in answers:
        assert idx.tolist() == expected.tolist()
        assert (dist[:5:2] == 0).all() and dist[1] == 0 and dist[4] == 0
        assert idx[:5].tolist() == [5, 8, 29, idx[3], 11] and mirrored[:5].tolist() == [False, False, False, mirrored[3], True]
        # RMS per value on the 0-1 scale: brute force's L2 over 3·32² values in [-1, 1], halved
        torch.testing.assert_close(dist.double(), d_all.amin(1) / (2 * (3 * 32 * 32) ** 0.5), rtol=1e-5, atol=1e-6)
    for other in answers[1:]:
        assert all(torch.equal(a, b) for a, b in zip(answers[0], other))


def test_nearest_excludes_a_query_s_own_image():
    """Leave-one-out: a real image of the training set must find its nearest OTHER image."""
    g = torch.Generator().manual_seed(1)
    train_images = torch.randint(0, 256, (20, 3, 64, 64), generator=g, dtype=torch.uint8)
    queries = train_images[[3, 17]].float() / 127.5 - 1
    d_all, _ = _brute_force(queries, train_images)
    d_all[0, 3] = d_all[1, 17] = float("inf")
    for chunk in (1, 6, 20):
        dist, idx, _ = nearest_training_images(queries, train_images, chunk=chunk, exclude=torch.tensor([3, 17]))
        assert idx.tolist() == d_all.argmin(1).tolist() and (dist > 0.1).all()


def test_sheet_size_and_blocks():
    g = torch.Generator().manual_seed(2)
    real, samples, nearest = (torch.rand(5, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3))
    sheet = make_sheet([("real", real), ("samples", samples), ("nearest", nearest)])
    grid = make_grid(samples, pad_value=PAD_VALUE)
    _, gh, gw = grid.shape
    _, h, w = sheet.image.shape
    assert w == 3 * gw + 2 * GAP and h > gh  # short labels: blocks as wide as their grids
    assert [b[2:] for b in sheet.boxes] == [(gw, gh)] * 3
    left, top, _, _ = sheet.boxes[1]
    assert top == h - gh and left == gw + GAP
    assert torch.equal(sheet.image[:, top:top + gh, left:left + gw], grid)
    r = 16  # sample 4 of a 3-wide grid: row 1, column 1
    cell = sheet.image[:, top + PAD + (r + PAD):top + PAD + (r + PAD) + r, left + PAD + (r + PAD):left + PAD + 2 * r + PAD]
    assert torch.equal(cell, to_uint8(samples[4]))
    assert (sheet.image[:, :top, :gw] < 128).any()  # the label is drawn above its block
    wide = make_sheet([("a label far wider than a 3-image grid of 16-pixel images", real), ("s", samples)])
    assert wide.image.shape[-1] > 2 * gw + GAP and wide.boxes[1][0] > gw + GAP  # labels never overlap


class _Pixels(torch.nn.Module):
    """A stand-in generator whose samples all differ (the tiny trained run's are near-identical grey)."""
    z_dim = 8

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 3 * 16 * 16)

    def forward(self, z):
        return torch.tanh(3 * self.lin(z)).view(-1, 3, 16, 16)


def _blocks(png, boxes):
    return [png[:, top:top + h, left:left + w] for left, top, w, h in boxes]


@pytest.mark.parametrize("kind", ["train", "train_loaded_again", "held_out", "heldout_split", "all_vs_train_split"])
def test_write_sheet_blocks_are_real_samples_nearest(tmp_path, kind):
    torch.manual_seed(4)
    nets = {"G_E": _Pixels(), "F": torch.nn.Identity(), "phi": torch.nn.Identity()}
    g = torch.Generator().manual_seed(5)
    (tmp_path / "set").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "set")  # one prepared set, spelled two ways
    train = ImageSet(torch.randint(0, 256, (30, 3, 16, 16), generator=g, dtype=torch.uint8), "train",
                     root=tmp_path / "set")
    held_out = kind in ("held_out", "heldout_split")
    # one prepared set of 42 with its last 12 held out: the sheet reads its splits, the same root
    split = ImageSet(torch.cat([train.images, torch.randint(0, 256, (12, 3, 16, 16), generator=g, dtype=torch.uint8)]),
                     "split", root=tmp_path / "alias", holdout=12)
    if kind in ("heldout_split", "all_vs_train_split"):
        train = split.split("train")
    data = {"train": train, "train_loaded_again": ImageSet(train.images.clone(), "again", root=tmp_path / "alias"),
            "held_out": ImageSet(torch.randint(0, 256, (20, 3, 16, 16), generator=g, dtype=torch.uint8), "other",
                                 root=tmp_path / "other"),
            "heldout_split": split.split("heldout"), "all_vs_train_split": split.split("all")}[kind]
    result = write_sheet(nets, data, train, 9, seed=7, path=tmp_path / "s.png")
    png = torch.from_numpy(np.array(Image.open(tmp_path / "s.png").convert("RGB"))).permute(2, 0, 1)
    samples = SamplingChain.of(nets).sample(STATS_N, 7)
    assert len({to_uint8(s).numpy().tobytes() for s in samples[:9]}) == 9
    grid = make_grid(samples[:9], pad_value=PAD_VALUE)
    assert [b[2:] for b in result.boxes] == [tuple(grid.shape[1:][::-1])] * 3
    real, middle, third = _blocks(png, result.boxes)
    assert torch.equal(middle, grid)
    step = 16 + PAD
    cells = [real[:, PAD + r * step:PAD + r * step + 16, PAD + k * step:PAD + k * step + 16].numpy().tobytes()
             for r in range(3) for k in range(3)]
    own = [im.numpy().tobytes() for im in data.images]
    assert len(set(cells)) == 9 and set(cells) <= set(own)  # 9 different images of the data set
    d_all, view = _brute_force(samples[:9], train.images)
    idx = d_all.argmin(1)
    mirrored = view[torch.arange(9), idx] == 1
    nearest = torch.where(mirrored[:, None, None, None], train.images[idx].flip(-1), train.images[idx])
    assert torch.equal(third, make_grid(nearest.float() / 127.5 - 1, pad_value=PAD_VALUE))
    assert [e["train_index"] for e in result.shown] == idx.tolist()
    every, _ = _brute_force(samples, train.images)  # the median is over all STATS_N samples, not the 9 shown
    torch.testing.assert_close(torch.tensor(result.nearest_median),
                               (every.amin(1) / (2 * (3 * 16 * 16) ** 0.5)).float().median(), rtol=1e-4, atol=1e-5)
    assert result.reference.startswith({"all_vs_train_split": "images of split, leave-one-out for those"}.get(
        kind, "held-out" if held_out else "other training images"))
    # every real image is behind the reference here (fewer than STATS_N): its median needs no draw order
    ref, _ = _brute_force(data.images.float() / 127.5 - 1, train.images)
    if not held_out:
        ref[:len(train)].fill_diagonal_(float("inf"))  # leave-one-out for those that are training images
    torch.testing.assert_close(torch.tensor(result.reference_median),
                               (ref.amin(1) / (2 * (3 * 16 * 16) ** 0.5)).float().median(), rtol=1e-4, atol=1e-5)
    # the blur control: the same real images, area-averaged to 8² and scaled back, the same exclusions
    soft = F.interpolate(F.interpolate(data.images.float() / 127.5 - 1, size=(8, 8), mode="area"), size=(16, 16),
                         mode="bilinear", align_corners=False)
    blur, _ = _brute_force(soft, train.images)
    if not held_out:
        blur[:len(train)].fill_diagonal_(float("inf"))
    torch.testing.assert_close(torch.tensor(result.blur_median),
                               (blur.amin(1) / (2 * (3 * 16 * 16) ** 0.5)).float().median(), rtol=1e-4, atol=1e-5)


def test_the_sheets_words_follow_its_numbers():
    """Further than real images: no sign of copying (the old line said 'look for copies' at ratio 1.45);
    closer, but not closer than blurred real images: blur explains it; closer than even those: copies."""
    def result(nearest, reference=0.2, blur=0.12):
        return SheetResult(Path("s.png"), 4, nearest, reference, "held-out images", [], blur_median=blur)
    far = result(0.29)  # ratio 1.45
    assert "no sign of copying" in far.summary() and "copies in the sheet" not in far.summary()
    assert "no sign of copying" in result(0.19).verdict()  # ratio 0.95: as far as real images
    soft = result(0.14)
    assert "blur" in soft.verdict() and "without any copying" in soft.verdict()
    close = result(0.05)
    assert "look for copies" in close.verdict() and "0.1200" in close.verdict()
    assert close.as_json()["verdict"] == close.verdict() and close.as_json()["blur_median"] == 0.12


def test_eval_writes_the_sheet(tiny_run, tmp_path, capsys):
    run, images = tmp_path / "run", tiny_run[1]
    shutil.copytree(tiny_run[0], run)  # the sheet and its record land beside the checkpoint
    ckpt = resolve_checkpoint(run)
    eval_main(["--ckpt", str(run), "--metrics", "swd", "--n", "8", "--seed", "3"])  # default: 16 per block
    path = run / f"eval-{ckpt.stem}-sheet.png"
    record = json.loads((run / f"eval-{ckpt.stem}.json").read_text())["sheet"]
    assert record["path"] == str(path) and record["n"] == 16
    assert record["reference"].startswith("other training images")  # the run's own data: leave-one-out
    assert 0 < record["nearest_median"] < 1 and 0 < record["reference_median"] < 1
    printed = capsys.readouterr().out
    assert "nearest training image" in printed and str(path) in printed
    png = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    _, nets = load_sampling_nets(ckpt)
    samples = SamplingChain.of(nets).sample(STATS_N, 3)[:16]
    grid = make_grid(samples, pad_value=PAD_VALUE)
    _, gh, gw = grid.shape
    assert png.shape[-1] == 3 * gw + 2 * GAP
    top = png.shape[1] - gh
    assert torch.equal(png[:, top:, gw + GAP:2 * gw + GAP], grid)
    # the third block: each sample's nearest training image (brute force's), mirrored when it matched so
    train_images = load_folder(images, 64).images
    d_all, view = _brute_force(samples, train_images)
    idx = d_all.argmin(1)
    assert [e["train_index"] for e in record["shown"]] == idx.tolist()
    mirrored = view[torch.arange(16), idx] == 1
    assert [e["mirrored"] for e in record["shown"]] == mirrored.tolist()
    nearest = torch.where(mirrored[:, None, None, None], train_images[idx].flip(-1), train_images[idx])
    third = png[:, top:, 2 * (gw + GAP):]
    assert torch.equal(third[:, :, :gw], make_grid(nearest.float() / 127.5 - 1, pad_value=PAD_VALUE))


def test_eval_sheet_against_held_out_images(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    other = make_image_folder(tmp_path / "other", n=6, seed=1)
    out = tmp_path / "e.json"
    eval_main(["--ckpt", str(run), "--data", str(other), "--metrics", "swd", "--n", "4", "--sheet-n", "2",
               "--out", str(out)])
    record = json.loads(out.read_text())["sheet"]
    assert record["path"] == str(tmp_path / "e-sheet.png") and (tmp_path / "e-sheet.png").exists()
    assert record["reference"] == f"held-out images of {other}"


@pytest.fixture(scope="module")
def trained_split(tmp_path_factory):
    """A run on a prepared set of 12 whose last 4 are held out."""
    root = tmp_path_factory.mktemp("eval_split")
    prepare(make_image_folder(root / "images"), root / "set", 64, encoded="none", holdout=4, progress=False)
    run = root / "run"
    run.mkdir()
    cfg = tiny_config(eval_metrics=(), data=str(root / "set"), kimg={"ae": 0.008, "embed": 0.008, "finetune": 0.008})
    train(cfg, run, progress=False, data=open_prepared(root / "set"))
    return run, root


def test_eval_scores_against_the_held_out_split(trained_split, tmp_path, capsys, monkeypatch):
    import aegan_fast.eval as eval_mod
    run, root = trained_split
    data = open_prepared(root / "set")
    held, train_split = data.split("heldout"), data.split("train")
    real_evaluate, scored = eval_mod.evaluate_run, []
    monkeypatch.setattr(eval_mod, "evaluate_run", lambda nets, ref, *a, **k: scored.append(ref) or
                        real_evaluate(nets, ref, *a, **k))
    out = tmp_path / "e.json"
    eval_main(["--ckpt", str(run), "--metrics", "swd", "--n", "10", "--sheet-n", "4", "--out", str(out)])
    record = json.loads(out.read_text())
    source = str(root / "images")
    assert record["n"] == 4 and record["reference"] == f"4 held-out real images of {source}"
    assert f"scoring against 4 held-out real images of {source}" in capsys.readouterr().out
    assert len(scored) == 1 and torch.equal(scored[0].images, held.images)
    sheet = record["sheet"]
    assert sheet["reference"] == f"held-out images of {source}"
    # nearest neighbours come from the training split: brute force over its 8 images only
    _, nets = load_sampling_nets(resolve_checkpoint(run))
    samples = SamplingChain.of(nets).sample(STATS_N, 0)[:4]
    d_all, _ = _brute_force(samples, train_split.images)
    assert [e["train_index"] for e in sheet["shown"]] == d_all.argmin(1).tolist()
    png = torch.from_numpy(np.array(Image.open(tmp_path / "e-sheet.png").convert("RGB"))).permute(2, 0, 1)
    _, gh, _ = make_grid(samples, pad_value=PAD_VALUE).shape
    top = png.shape[1] - gh
    left = int((png[:, top] == PAD_VALUE).all(0).nonzero()[0])  # the real block's grid starts at its grey pad
    step = 64 + PAD
    cells = [png[:, top + PAD + r * step:top + PAD + r * step + 64, left + PAD + c * step:left + PAD + c * step + 64]
             .numpy().tobytes() for r in range(2) for c in range(2)]
    assert len(set(cells)) == 4 and set(cells) <= {im.numpy().tobytes() for im in held.images}  # held-out images
    # --data another prepared set: its own held-out split
    prepare(make_image_folder(tmp_path / "other", n=10, seed=3), tmp_path / "other-set", 64, encoded="none",
            holdout=3, progress=False)
    eval_main(["--ckpt", str(run), "--data", str(tmp_path / "other-set"), "--metrics", "swd", "--n", "10",
               "--no-sheet", "--out", str(out)])
    assert json.loads(out.read_text())["reference"] == f"3 held-out real images of {tmp_path / 'other'}"


def test_eval_no_sheet_and_bad_sheet_n(tiny_run, tmp_path, capsys):
    run, images = tiny_run
    out = tmp_path / "e.json"
    eval_main(["--ckpt", str(run), "--metrics", "swd", "--n", "4", "--no-sheet", "--out", str(out)])
    assert "sheet" not in json.loads(out.read_text()) and not (tmp_path / "e-sheet.png").exists()
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as e:
            eval_main(["--ckpt", str(run), "--metrics", "swd", "--sheet-n", bad, "--out", str(out)])
        assert e.value.code == 2 and f"--sheet-n must be ≥ 1, got {bad}" in capsys.readouterr().err
