"""Shared fixtures: tiny models and synthetic image folders so every test runs in seconds on 2 cores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aegan_fast.config import TrainConfig
from aegan_fast.models import ModelConfig


def tiny_config(**overrides) -> TrainConfig:
    """R=64 with narrow nets: same structure as the real thing, a fraction of the cost."""
    cfg = TrainConfig(
        preset="test",
        model=ModelConfig(resolution=64, ae_channels=16, ge_base_channels=32, embed_max_channels=32,
                          max_channels=32),
        batch=4, kimg={"ae": 0.016, "embed": 0.016, "finetune": 0.016},
        lr={"H": 2e-3, "F": 2e-3, "G_E": 2e-4, "D_E": 2e-4, "phi": 2e-4, "D_R": 2e-4},
        sample_every_kimg=0.008, ckpt_every_kimg=0.008, log_every_steps=2, grid_size=16, ema_kimg=0.01, eval_n=16,
        device="cpu")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_image_folder(root, n=12, size=80, seed=0):
    """Coloured discs on white, saved as PNG/JPEG/WebP in nested folders (what --data accepts)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = np.full((size, size, 3), 255, np.uint8)
        cx, cy, r = rng.integers(20, size - 20, 2).tolist() + [int(rng.integers(10, 20))]
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 200, 3)
        sub = root / f"set{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        ext = ("png", "jpg", "webp")[i % 3]
        Image.fromarray(img).save(sub / f"img{i}.{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Decoded-image caches go to a per-test folder; the real emoji cache is never touched."""
    monkeypatch.setenv("AEGAN_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(run directory, its image folder): tiny_config() trained through its three stages once per
    session (the run records its data, as a CLI run does), shared by the tests that only read it.
    A test that must change a run copies it (shutil.copytree); one that writes here fails at the end."""
    from aegan_fast.data import load_folder
    from aegan_fast.training import train
    root = tmp_path_factory.mktemp("tiny_run")
    images = make_image_folder(root / "images")
    run = root / "run"
    run.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # before any test's own cache: session scope
        mp.setenv("AEGAN_CACHE", str(root / "cache"))
        torch.manual_seed(0)
        train(tiny_config(data=str(images)), run, progress=False, data=load_folder(images, 64))
    before = _tree(run)
    yield run, images
    assert _tree(run) == before, f"a test changed the shared run {run}: copy it with shutil.copytree first"
