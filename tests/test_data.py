"""Data pipeline: prepare on a nasty real-world folder, archives, interruption, the torch and DALI
loaders (same tensors), resumable loader order, and training on a prepared set."""
from __future__ import annotations

import importlib
import io
import json
import os
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from aegan_fast.data import (DaliLoader, TorchLoader, choose_loader, dali_unavailable, decode, load_dataset,
                             open_prepared, prepare)
from aegan_fast.data.__main__ import main as data_main
from aegan_fast.errors import UserError
from aegan_fast.training import train
from conftest import make_image_folder, tiny_config

R = 64
prepare_mod = importlib.import_module("aegan_fast.data.prepare")  # the package exports a function of that name


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width×height pixels (1-bit) but holds no image data: Pillow reads the size
    from the header, which is all a decompression-bomb check needs to see."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _jpeg_bytes(im, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def nasty_folder(root):
    """Good images of every kind next to every bad file the issue names. Returns (good, bad) names."""
    make_image_folder(root, n=6, size=80)                      # png/jpg/webp RGB in set0/, set1/
    good = {f"set{i % 2}/img{i}.{('png', 'jpg', 'webp')[i % 3]}" for i in range(6)}
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (96, 120, 3), dtype=np.uint8))
    odd = root / "odd"
    odd.mkdir()
    # 16-bit grayscale: a flat 0x8080 must come out as 128, not clipped to 255
    Image.fromarray(np.full((72, 72), 0x8080, np.uint16)).save(odd / "gray16.png")
    rgb.convert("L").save(odd / "gray.png")
    rgb.convert("CMYK").save(odd / "cmyk.jpg")
    rgba = np.zeros((70, 70, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:35, :, 3] = 255                                      # top half opaque red, bottom transparent
    Image.fromarray(rgba, "RGBA").save(odd / "rgba.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(odd / "palette.png")
    pal_t = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal_t.info["transparency"] = 0
    pal_t.save(odd / "palette_transparent.png", transparency=0)
    rgb.save(odd / "photo.tiff")
    good |= {"odd/gray16.png", "odd/gray.png", "odd/cmyk.jpg", "odd/rgba.png", "odd/palette.png",
             "odd/palette_transparent.png", "odd/photo.tiff"}

    bad = root / "bad"
    bad.mkdir()
    full = _jpeg_bytes(rgb, quality=90)
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.png").write_text("this is not a PNG\n")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(bad / "tiny8x8.png")
    (bad / "bomb.png").write_bytes(_png_header(20000, 20000))     # over 2× the limit: Pillow refuses
    (bad / "big.png").write_bytes(_png_header(10000, 9500))       # over 1× the limit: we refuse
    (bad / "notes.txt").write_text("hello")
    (bad / "table.csv").write_text("a,b\n1,2\n")
    os.symlink(".", bad / "loop")                                 # folder symlink loop
    os.symlink("self.png", bad / "self.png")                      # file symlink loop
    os.symlink("missing.png", bad / "dangling.png")
    bads = {"bad/truncated.jpg": "truncated", "bad/zero.jpg": "empty", "bad/text.png": "not a decodable",
            "bad/tiny8x8.png": "too small", "bad/bomb.png": "decompression-bomb", "bad/big.png": "decompression-bomb",
            "bad/notes.txt": "not an image", "bad/table.csv": "not an image", "bad/loop/": "symlink loop",
            "bad/self.png": "symlink loop", "bad/dangling.png": "broken symlink"}
    return good, bads


def test_prepare_nasty_folder_then_train(tmp_path):
    src = tmp_path / "nasty"
    good, bad = nasty_folder(src)
    out = tmp_path / "prepared"
    data_main(["prepare", str(src), str(out), "--resolution", str(R), "--no-progress", "--workers", "2"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["count"] == len(good) and m["resolution"] == R
    assert {r["source"] for r in m["images"]} == good
    assert all(len(r["sha256"]) == 64 for r in m["images"])
    reasons = {s["source"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == set(bad), reasons
    for name, word in bad.items():
        assert word in reasons[name], (name, reasons[name])
    assert (out / "files").is_dir() and len(list((out / "files").glob("*.png"))) == len(good)

    data = open_prepared(out)
    assert data.images.shape == (len(good), 3, R, R) and data.images.dtype == torch.uint8
    assert torch.equal(load_dataset(str(out), R).images, data.images)    # what --data PREPARED_SET reads
    by_name = {r["source"]: r["index"] for r in m["images"]}
    gray16 = data.images[by_name["odd/gray16.png"]]
    assert (gray16 == 128).all()                               # scaled, not clipped
    rgba = data.images[by_name["odd/rgba.png"]]
    assert (rgba[:, 2:28] == torch.tensor([255, 0, 0])[:, None, None]).all()    # opaque red stays red
    assert (rgba[:, 36:] == 255).all()                         # transparency flattened onto white

    run = tmp_path / "run"
    run.mkdir()
    train(tiny_config(loader="torch"), run, progress=False, data=data)
    assert (run / "checkpoints" / "stage-finetune.pt").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["data_wait"] < 1 for r in rows if "losses" in r)


def test_no_usable_image_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.png").write_text("nope")
    (src / "b.jpg").write_bytes(b"")
    (src / "c.txt").write_text("text")
    with pytest.raises(SystemExit) as e:
        data_main(["prepare", str(src), str(tmp_path / "out"), "-r", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no images usable" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(SystemExit) as e:
        data_main(["prepare", str(tmp_path / "missing"), str(tmp_path / "out"), "-r", "64"])
    assert e.value.code == 2


@pytest.mark.parametrize("r", [100, 32, 96])
def test_an_untrainable_resolution_is_refused_before_any_work(tmp_path, image_folder, capsys, r):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        data_main(["prepare", str(image_folder), str(out), "-r", str(r), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "power of two ≥ 64" in err and f"got {r}" in err and "Traceback" not in err
    assert not out.exists()                                  # nothing decoded, nothing written
    with pytest.raises(UserError, match="power of two"):     # the library call that --data uses, too
        prepare(image_folder, out, r, progress=False)
    assert prepare(image_folder, out, 2 * R, encoded="none", progress=False)["resolution"] == 2 * R


def test_archives_give_the_same_set_as_the_folder(tmp_path):
    src = make_image_folder(tmp_path / "imgs", n=6, size=72)
    (src / "readme.txt").write_text("x")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(src))
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as t:
        t.add(src, arcname=".")
    sets = [open_prepared(tmp_path / name) for name in ("a", "b", "c") if prepare(
        {"a": src, "b": tmp_path / "imgs.zip", "c": tmp_path / "imgs.tar.gz"}[name], tmp_path / name, R,
        encoded="none", progress=False)]
    for s in sets[1:]:
        assert torch.equal(s.images, sets[0].images)
    assert [r["sha256"] for r in sets[1].manifest["images"]] == [r["sha256"] for r in sets[0].manifest["images"]]
    assert sets[1].manifest["source_kind"] == "zip" and sets[2].manifest["source_kind"] == "tar"


def test_dedup_pad_and_settings(tmp_path):
    src = make_image_folder(tmp_path / "imgs", n=3, size=72)
    (src / "copy.png").write_bytes((src / "set0" / "img0.png").read_bytes())
    Image.new("RGB", (120, 40), (10, 20, 30)).save(src / "wide.png")
    m = prepare(src, tmp_path / "d", R, dedup=True, fit="pad", background=(0, 0, 0), encoded="none", progress=False)
    assert m["count"] == 4
    assert [(s["source"], s["reason"]) for s in m["skipped"]] == [("set0/img0.png", "exact duplicate of copy.png")]
    wide = open_prepared(tmp_path / "d").images[[r["source"] for r in m["images"]].index("wide.png")]
    assert (wide[:, 0] == 0).all() and (wide[:, R // 2] == torch.tensor([10, 20, 30])[:, None]).all()  # padded
    # the same OUT with other settings is refused, then replaced with --overwrite
    with pytest.raises(UserError, match="--overwrite"):
        prepare(src, tmp_path / "d", R, encoded="none", progress=False)
    assert prepare(src, tmp_path / "d", R, encoded="none", progress=False, overwrite=True)["count"] == 5
    # a prepared set at another resolution is a clear error for the trainer's --data
    with pytest.raises(UserError, match="prepared at 64"):
        load_dataset(str(tmp_path / "d"), 128)


def test_interrupted_prepare_resumes_and_never_looks_complete(tmp_path, monkeypatch):
    src = make_image_folder(tmp_path / "imgs", n=10, size=72)
    out = tmp_path / "out"
    monkeypatch.setattr(prepare_mod, "CHUNK", 3)
    calls, crash = [], True
    real = prepare_mod._process

    def crash_after_two_chunks(entry, *a):
        calls.append(entry.name)
        if len(calls) == 7 and crash:
            raise KeyboardInterrupt
        return real(entry, *a)

    monkeypatch.setattr(prepare_mod, "_process", crash_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, R, workers=1, progress=False)
    assert not (out / "manifest.json").exists() and len(list((out / ".partial").glob("chunk-*.npz"))) == 2
    with pytest.raises(UserError, match="interrupted"):
        open_prepared(out)
    with pytest.raises(UserError, match="interrupted preparation"):
        prepare(src, out, 128, workers=1, progress=False)        # other settings: refused
    calls.clear()
    crash = False
    m = prepare(src, out, R, workers=1, progress=False)          # resumes: only the last two chunks
    assert m["count"] == 10 and len(calls) == 4 and not (out / ".partial").exists()
    fresh = prepare(src, tmp_path / "fresh", R, workers=1, progress=False, encoded="none")
    assert torch.equal(open_prepared(out).images, open_prepared(tmp_path / "fresh").images)
    assert [r["sha256"] for r in m["images"]] == [r["sha256"] for r in fresh["images"]]


def test_raw_folder_is_prepared_once_into_the_cache(tmp_path, image_folder):
    a = load_dataset(str(image_folder), R)
    assert len(a) == 12 and a.root is not None and a.root.is_relative_to(tmp_path / "cache")
    mtime = (a.root / "manifest.json").stat().st_mtime_ns
    b = load_dataset(str(image_folder), R)
    assert (b.root / "manifest.json").stat().st_mtime_ns == mtime and torch.equal(a.images, b.images)
    Image.new("RGB", (70, 70), (1, 2, 3)).save(image_folder / "new.png")   # new contents: a new cache entry
    assert len(load_dataset(str(image_folder), R)) == 13


def _prepared(tmp_path, n=10, encoded="png"):
    src = make_image_folder(tmp_path / "imgs", n=n, size=72)
    prepare(src, tmp_path / "set", R, encoded=encoded, progress=False)
    return open_prepared(tmp_path / "set")


def test_torch_loader_order_is_resumable_sharded_and_memory_mapped(tmp_path):
    data = _prepared(tmp_path, encoded="none")
    B = 4
    straight = TorchLoader(data, B, seed=3, device="cpu")
    batches = [next(straight) for _ in range(8)]
    straight.close()
    resumed = TorchLoader(data, B, seed=3, device="cpu", start=5 * B)   # as after a checkpoint at step 5
    for want in batches[5:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    resumed.close()
    # every image once per epoch; the images match the array with the mirror bits applied
    first = torch.cat([b[1] for b in batches])[: len(data)]
    assert sorted(first.tolist()) == list(range(len(data)))
    x, idx, mirror = batches[0]
    ref = data.images[idx].float() / 127.5 - 1
    ref[mirror] = ref[mirror].flip(-1)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    # two ranks share one stream without overlap
    r0 = TorchLoader(data, 2, seed=1, device="cpu", shard=(0, 2), workers=0)
    r1 = TorchLoader(data, 2, seed=1, device="cpu", shard=(1, 2), workers=0)
    seen = torch.cat([t for _ in range(2) for t in (next(r0)[1], next(r1)[1])])
    assert len(set(seen.tolist())) == 8
    # memory-mapped when the set does not fit the RAM cache: same batches
    mapped = open_prepared(tmp_path / "set", cache_mb=0)
    assert not mapped.in_ram and data.in_ram
    m = TorchLoader(mapped, B, seed=3, device="cpu")
    assert torch.equal(next(m)[0], batches[0][0])
    m.close()
    assert choose_loader(data, torch.device("cpu"))[0] == "torch"


def test_decode_handles_icc_and_16bit_rgb():
    im = Image.fromarray(np.full((40, 40, 3), 200, np.uint8))
    from PIL import ImageCms
    buf = io.BytesIO()
    im.save(buf, "PNG", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    out = decode(buf.getvalue(), 16)
    assert out.shape == (16, 16, 3) and abs(int(out[8, 8, 0]) - 200) <= 1


dali_reason = dali_unavailable()


@pytest.mark.skipif(dali_reason is not None, reason=f"DALI not installed: {dali_reason}")
@pytest.mark.parametrize("encoded", ["png", "jpeg"])
def test_dali_cpu_and_torch_loaders_give_the_same_tensors(tmp_path, encoded):
    data = _prepared(tmp_path, n=8, encoded=encoded)
    kw = dict(seed=0, device="cpu", shuffle=False, flip=False, workers=2)
    t, d = TorchLoader(data, 4, **kw), DaliLoader(data, 4, **kw)
    for _ in range(3):  # crosses the end of the first epoch (auto_reset)
        (xt, it, _), (xd, id_, md) = next(t), next(d)
        assert torch.equal(it, id_) and not md.any()
        assert xd.dtype == xt.dtype == torch.float32 and xd.shape == xt.shape and xd.is_contiguous()
        if encoded == "png":   # lossless: equal up to float rounding of the normalisation
            torch.testing.assert_close(xd, xt, rtol=0, atol=1e-6)
        else:                  # JPEG q95 4:4:4: within decode tolerance
            assert (xd - xt).abs().mean() < 0.02 and (xd - xt).abs().max() < 0.25
    t.close(), d.close()
    # flips: DALI's mirror bits say which images it flipped
    d = DaliLoader(data, 8, seed=1, device="cpu", shuffle=True, flip=True, workers=1)
    x, idx, mirror = next(d)
    ref = data.images[idx].float() / 127.5 - 1
    ref[mirror] = ref[mirror].flip(-1)
    assert sorted(idx.tolist()) == list(range(8))
    if encoded == "png":
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)


@pytest.mark.skipif(dali_reason is not None or not torch.cuda.is_available(),
                    reason="DALI's GPU ('mixed') decoder needs DALI and a CUDA GPU; none here")
def test_dali_gpu_loader_matches_torch(tmp_path):
    data = _prepared(tmp_path, n=8, encoded="jpeg")
    kw = dict(seed=0, device="cuda", shuffle=False, flip=False)
    (xt, it, _), (xd, id_, _) = next(TorchLoader(data, 8, **kw)), next(DaliLoader(data, 8, **kw))
    assert xd.is_cuda and torch.equal(it, id_) and (xd - xt).abs().mean() < 0.02


def test_train_with_dali_cpu_loader(tmp_path, image_folder):
    if dali_reason is not None:
        pytest.skip(f"DALI not installed: {dali_reason}")
    data = load_dataset(str(image_folder), R)
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(loader="dali", kimg={"ae": 0.008, "embed": 0.008, "finetune": 0.008})
    train(cfg, run, progress=False, data=data)
    assert (run / "checkpoints" / "stage-finetune.pt").exists()


def test_trainer_data_wait_measures_time_blocked_on_the_loader(tmp_path, image_folder, monkeypatch):
    """data_wait in metrics.jsonl is the share of step time spent in next(loader): a loader that
    sleeps 0.3 s per batch must show up as most of the step."""
    import time as time_mod

    import aegan_fast.training.loop as train_mod

    real = train_mod.make_loader

    class Slow:
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            time_mod.sleep(0.3)
            return next(self.inner)

        def __getattr__(self, name):  # close, state_dict
            return getattr(self.inner, name)

    monkeypatch.setattr(train_mod, "make_loader", lambda *a, **k: Slow(real(*a, **k)))
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(kimg={"ae": 0.016, "embed": 0.0, "finetune": 0.0}, eval_metrics=())
    train(cfg, run, progress=False, data=load_dataset(str(image_folder), R))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait"] for r in rows if "losses" in r]
    assert waits and all(0.5 < w < 1 for w in waits), waits


@pytest.mark.skipif(dali_reason is not None, reason=f"DALI not installed: {dali_reason}")
def test_dali_loader_resumes_from_its_checkpoint(tmp_path):
    data = _prepared(tmp_path, n=7)
    a = DaliLoader(data, 3, seed=2, device="cpu", workers=1)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    want = [next(a) for _ in range(4)]                         # crosses epoch ends
    b = DaliLoader(data, 3, seed=2, device="cpu", workers=1, start=9, state=state)
    for (xw, iw, mw), (xg, ig, mg) in zip(want, (next(b) for _ in range(4))):
        assert torch.equal(iw, ig) and torch.equal(mw, mg) and torch.equal(xw, xg)


@pytest.mark.skipif(dali_reason is not None, reason=f"DALI not installed: {dali_reason}")
def test_resume_with_dali_matches_an_uninterrupted_run(tmp_path, image_folder):
    from aegan_fast.checkpoint import load_checkpoint
    data = load_dataset(str(image_folder), R)
    cfg = tiny_config(loader="dali", kimg={"ae": 0.016, "embed": 0.008, "finetune": 0.0}, eval_metrics=())
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    train(cfg, straight, progress=False, data=data)
    train(cfg, split, progress=False, data=data, stop_after_steps=3)
    train(cfg, split, resume=True, progress=False, data=data)
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["counters"] == b["counters"]
    for k in a["nets"]:
        torch.testing.assert_close(a["nets"][k], b["nets"][k], rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- the held-out split

SALT = b"aegan_fast-holdout-v1\0"


def _ranked(names, groups=True):
    """Names in the documented held-out order, computed here independently of prepare.py: by
    sha256(salt + name with emoji skin-tone modifiers removed), ties by sha256(salt + name)."""
    import hashlib
    import re

    def rank(name):
        group = re.sub(r"-1f3f[bcdef](?=\.)", "", name) if groups else name
        return hashlib.sha256(SALT + group.encode()).hexdigest(), hashlib.sha256(SALT + name.encode()).hexdigest()
    return sorted(names, key=rank)


def _expected_heldout(names, k):
    return set(_ranked(names)[:k])


def _flat_images(root, names, colours):
    """One flat-coloured PNG per name: an image's row in images.npy tells which file it came from."""
    root.mkdir(parents=True, exist_ok=True)
    for name, c in zip(names, colours):
        Image.new("RGB", (72, 72), c).save(root / name)
    return root


def _colour_of(names):
    return {n: (i * 9 % 256, i * 37 % 256, 200 - i) for i, n in enumerate(names)}


# 14 single images and one emoji in its five skin tones: a group the split keeps together
NAMES = [f"pic{i:02d}.png" for i in range(14)] + ["1f44d.png"] + [f"1f44d-1f3f{t}.png" for t in "bcdef"]


def test_holdout_is_the_smallest_name_hashes_as_the_last_rows(tmp_path):
    colour = _colour_of(NAMES)
    src = _flat_images(tmp_path / "src", NAMES, [colour[n] for n in NAMES])
    tones = {n for n in NAMES if n.startswith("1f44d")}
    order = _ranked(NAMES)
    k = max(order.index(t) for t in tones) + 1  # the emoji's group is the last one held out
    assert k < len(NAMES) - 1 and len(tones & set(_ranked(NAMES, groups=False)[:k])) < len(tones)
    m = prepare(src, tmp_path / "a", R, encoded="none", holdout=k, progress=False)
    want = _expected_heldout(NAMES, k)
    assert m["holdout"] == k and m["count"] == len(NAMES) and "sha256" in m["holdout_rule"]
    rows = {r["source"]: r["index"] for r in m["images"]}
    assert [r["index"] for r in m["images"]] == list(range(len(NAMES)))
    assert {n for n, i in rows.items() if i >= len(NAMES) - k} == want
    data = open_prepared(tmp_path / "a")
    for name, i in rows.items():  # every row holds its own file's pixels
        assert (data.images[i] == torch.tensor(colour[name], dtype=torch.uint8)[:, None, None]).all(), name
    train, held, every = data.split("train"), data.split("heldout"), data.split("all")
    assert len(train) == len(NAMES) - k and len(held) == k and torch.equal(every.images, data.images)
    assert torch.equal(torch.cat([train.images, held.images]), data.images)      # disjoint, and together all
    assert train.images.data_ptr() == data.images.data_ptr()                      # views, not copies
    assert held.images.untyped_storage().data_ptr() == data.images.untyped_storage().data_ptr()
    assert data.reference().part == "heldout" and "held-out" in held.source and "training" in train.source
    assert train.split("heldout").start == held.start                             # from any view
    mapped = open_prepared(tmp_path / "a", cache_mb=0).split("heldout")          # memory-mapped: still a slice
    assert not mapped.in_ram and torch.equal(mapped.images, held.images)
    assert tones <= want  # the five tones of one emoji, one group: held out together (by names alone, not)
    # deterministic: a second preparation orders every row the same way
    again = prepare(src, tmp_path / "b", R, encoded="none", holdout=k, progress=False)
    assert again["images"] == m["images"]


def test_adding_or_removing_a_file_moves_at_most_one_other_image(tmp_path):
    """For a fixed k: a new file enters the held-out set only if it ranks among the k smallest, and
    then only the former largest leaves; every other image keeps its side. Removing one likewise."""
    names = NAMES[:14]
    k = 5
    colour = _colour_of(names + [f"extra{i}.png" for i in range(40)])
    src = _flat_images(tmp_path / "src", names, [colour[n] for n in names])

    def heldout(out):
        m = prepare(src, tmp_path / out, R, encoded="none", holdout=k, progress=False)
        return {r["source"] for r in m["images"] if r["index"] >= m["count"] - k}
    before = heldout("before")
    # one extra name that ranks inside the held-out set, one that ranks outside (found by the rule above)
    extras = [f"extra{i}.png" for i in range(40)]
    inside = next(e for e in extras if e in _expected_heldout(names + [e], k))
    outside = next(e for e in extras if e not in _expected_heldout(names + [e], k))
    _flat_images(src, [outside], [colour[outside]])
    assert heldout("outside") == before
    _flat_images(src, [inside], [colour[inside]])
    now = heldout("inside")
    assert inside in now and len(before - now) == 1 and now - before == {inside}
    (src / inside).unlink(), (src / outside).unlink()
    (src / sorted(before)[0]).unlink()                                   # a held-out image goes away
    after = heldout("removed")
    assert len(after - before) == 1 and before - after == {sorted(before)[0]}


def test_holdout_auto_and_bad_values(tmp_path, capsys):
    from aegan_fast.data.prepare import holdout_count
    assert [holdout_count("auto", n) for n in (12, 99, 100, 101, 3333, 3334, 3391, 10 ** 6)] == \
        [0, 0, 30, 30, 999, 1000, 1000, 1000]
    src = make_image_folder(tmp_path / "src", n=12, size=72)
    assert prepare(src, tmp_path / "auto", R, encoded="none", progress=False)["holdout"] == 0   # under 100 images
    out = tmp_path / "out"
    for bad, words in (("-1", "must be ≥ 0"), ("11", "leaves 1 of 12"), ("12", "leaves 0 of 12"),
                       ("many", "expected 'auto' or a whole number")):
        with pytest.raises(SystemExit) as e:
            data_main(["prepare", str(src), str(out), "-r", str(R), "--holdout", bad, "--no-progress"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and "Traceback" not in err, (bad, err)
        assert not (out / "manifest.json").exists() and not (out / ".partial").exists()   # refused before decoding
    for bad in (1.5, True, "3"):
        with pytest.raises(UserError, match="--holdout must be"):
            prepare(src, out, R, holdout=bad, progress=False)
    data_main(["prepare", str(src), str(out), "-r", str(R), "--holdout", "10", "--no-progress", "--encoded", "none"])
    assert "2 train / 10 held out" in capsys.readouterr().out and open_prepared(out).holdout == 10


def test_set_prepared_before_the_split_opens_with_none_held_out(tmp_path, caplog):
    src = make_image_folder(tmp_path / "src", n=6, size=72)
    prepare(src, tmp_path / "old", R, encoded="none", holdout=2, progress=False)
    path = tmp_path / "old" / "manifest.json"
    m = json.loads(path.read_text())
    for key in ("holdout", "holdout_requested", "holdout_rule"):
        del m[key]
    path.write_text(json.dumps(m))
    data = open_prepared(tmp_path / "old")
    assert data.holdout == 0 and len(data.split("train")) == 6
    with caplog.at_level("WARNING", logger="aegan_fast.data"):
        assert data.reference().part == "all"
    assert "no held-out images" in caplog.text and "memorising" in caplog.text
    with pytest.raises(UserError, match="no held-out images"):
        data.split("heldout")
    with pytest.raises(UserError, match="before held-out splits existed"):
        prepare(src, tmp_path / "old", R, encoded="none", progress=False)
    m["holdout"] = 6
    path.write_text(json.dumps(m))
    with pytest.raises(UserError, match="held out"):
        open_prepared(tmp_path / "old")


MAGENTA = torch.tensor([255, 0, 255], dtype=torch.uint8)


def _marked_set(tmp_path, n=12, k=4):
    """A prepared set whose held-out images, and only those, are flat magenta."""
    names = [f"im{i:02d}.png" for i in range(n)]
    held = _expected_heldout(names, k)
    rng = np.random.default_rng(0)
    colours = [(255, 0, 255) if name in held else tuple(int(c) for c in rng.integers(0, 200, 3)) for name in names]
    src = _flat_images(tmp_path / "marked", names, colours)
    prepare(src, tmp_path / "marked-set", R, encoded="png", holdout=k, progress=False)
    data = open_prepared(tmp_path / "marked-set")
    assert data.holdout == k and _magenta(data.split("heldout").images).all()
    assert not _magenta(data.split("train").images).any()
    return data


def _magenta(x):
    """Which images of a uint8 batch (or a float one in [-1, 1]) are flat magenta."""
    if x.dtype != torch.uint8:
        x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return (x == MAGENTA.to(x.device)[:, None, None]).flatten(1).all(1)


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_loaders_over_the_training_split_never_read_held_out_images(tmp_path, kind):
    if kind == "dali" and dali_reason is not None:
        pytest.skip(f"DALI not installed: {dali_reason}")
    train = _marked_set(tmp_path).split("train")
    loader = (TorchLoader if kind == "torch" else DaliLoader)(train, 4, seed=1, device="cpu", workers=1)
    seen = set()
    for _ in range(9):  # four epochs of the 8 training images
        x, idx, _ = next(loader)
        assert not _magenta(x).any() and (idx < len(train)).all()
        seen |= set(idx.tolist())
    loader.close()
    assert seen == set(range(len(train)))


def test_the_trainer_never_draws_held_out_images_and_scores_against_them(tmp_path, monkeypatch, caplog):
    import aegan_fast.data.dataset as dataset_mod
    import aegan_fast.training.loop as train_mod
    import aegan_fast.training.run_log as run_log_mod
    data = _marked_set(tmp_path)
    drawn, scored = [], []
    real_loader, real_gather, real_spread = train_mod.make_loader, dataset_mod.ImageSet.gather, \
        dataset_mod.ImageSet.spread
    real_eval = run_log_mod.evaluate_run

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            batch = next(self.inner)
            drawn.append(batch[0])
            return batch

        def __getattr__(self, name):
            return getattr(self.inner, name)

    def gather(self, *a, **k):
        out = real_gather(self, *a, **k)
        drawn.append(out)
        return out

    def spread(self, *a, **k):
        out = real_spread(self, *a, **k)
        if self.part != "heldout":  # the stage-end scores spread the reference; everything else must not see it
            drawn.append(out)
        return out

    def evaluate(nets, reference, *a, **k):
        scored.append(reference)
        return real_eval(nets, reference, *a, **k)

    monkeypatch.setattr(train_mod, "make_loader", lambda *a, **k: Recording(real_loader(*a, **k)))
    monkeypatch.setattr(dataset_mod.ImageSet, "gather", gather)
    monkeypatch.setattr(dataset_mod.ImageSet, "spread", spread)
    monkeypatch.setattr(run_log_mod, "evaluate_run", evaluate)
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(loader="torch", kimg={"ae": 0.008, "embed": 0.008, "finetune": 0.008}, eval_metrics=("swd",))
    with caplog.at_level("INFO", logger="aegan_fast.training"):
        train(cfg, run, progress=False, data=data)
    assert "data: 12 images, 8 train / 4 held out for scoring" in caplog.text
    assert len(drawn) > 5 and not any(_magenta(x).any() for x in drawn)
    assert scored and all(r.part == "heldout" and _magenta(r.images).all() for r in scored)
    from aegan_fast.checkpoint import load_checkpoint
    assert load_checkpoint(run)["data"] == {"count": 12, "holdout": 4}


def test_resuming_on_another_split_is_an_error(tmp_path, caplog):
    from aegan_fast.data import ImageSet
    from aegan_fast.training.run_state import check_same_split
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    data = ImageSet(images, "ten", holdout=3).split("train")
    check_same_split({"count": 10, "holdout": 3}, data)
    for saved in ({"count": 10, "holdout": 0}, {"count": 11, "holdout": 3}):
        with pytest.raises(UserError, match="differs from the run's"):
            check_same_split(saved, data)
    with caplog.at_level("WARNING", logger="aegan_fast.training"):
        check_same_split(None, data)   # a checkpoint from before the split: it trained on every image
    assert "predates held-out splits" in caplog.text
    caplog.clear()
    check_same_split(None, ImageSet(images, "ten"))
    assert not caplog.text
    with pytest.raises(ValueError, match="split must be one of"):
        data.split("test")
    with pytest.raises(ValueError, match="leave a training image"):
        ImageSet(images, "ten", holdout=10)


def test_the_torch_loader_on_a_cpu_loads_in_the_training_thread_unless_told(tmp_path, caplog):
    """--loader-workers unset: no loader threads for the torch loader on a CPU device (their OpenMP
    teams contend with the step's threads), 2 on a GPU and for DALI; a number given is kept."""
    from aegan_fast.data.loaders import loader_threads, make_loader
    assert loader_threads("torch", torch.device("cpu"))[0] == 0
    assert loader_threads("torch", torch.device("cuda"))[0] == 2
    assert loader_threads("dali", torch.device("cpu"))[0] == 2
    data = load_dataset(make_image_folder(tmp_path / "imgs", 6), 64)
    with caplog.at_level("INFO", logger="aegan_fast.data"):
        default = make_loader("auto", data, 2, 0, "cpu")
    told = make_loader("torch", data, 2, 0, "cpu", workers=1)
    try:
        assert default._pool is None and "loader threads: 0" in caplog.text
        assert told._pool is not None and told.depth == 1
        a, b = next(default), next(make_loader("torch", data, 2, 0, "cpu", workers=2))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # threads or not, the same batches
    finally:
        default.close(), told.close()
