"""A chain stage that makes SWD worse is warned about and not sampled from: the trainer's choice
(checkpoints/sampling), what sampling a run directory loads, and the stage-end panel of losses.png.
The stage-end figures are chosen by the test (stage_end_evaluation patched), the training is real."""
import json
import logging
import shutil
from contextlib import contextmanager

import pytest
import torch

from aegan_fast.training import loop as loop_module
from aegan_fast.checkpoint import SAMPLING, load_checkpoint, resolve_checkpoint
from aegan_fast.training.run_state import load_sampling_nets
from aegan_fast.data import load_folder
from aegan_fast.training import train
from aegan_fast.training.run_log import sampling_summary
from aegan_fast.viz import plot_metrics
from conftest import make_image_folder, tiny_config

KIMG = {"ae": 0.004, "embed": 0.008, "finetune": 0.008}


@contextmanager
def captured_logs():
    """aegan_fast's log records at INFO and above, for a module-scoped run (caplog is per test)."""
    records, logger = [], logging.getLogger("aegan_fast")
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_with_figures(root, figures: dict, stop_after_steps=None, resume=False, patch=None, **cfg_overrides):
    """Train tiny nets with stage_end_evaluation reporting figures[stage]; (run, log messages)."""
    run = root / "run"
    run.mkdir(exist_ok=True)
    cfg = tiny_config(kimg=dict(KIMG), **cfg_overrides)
    with pytest.MonkeyPatch.context() as mp, captured_logs() as records:
        mp.setattr(loop_module, "stage_end_evaluation", lambda stage, st: dict(figures.get(stage.name, {})))
        if patch is not None:
            patch(mp)
        train(cfg, run, resume=resume, progress=False, stop_after_steps=stop_after_steps,
              data=load_folder(make_image_folder(root / "images"), 64))
    return run, [(r.levelno, r.getMessage()) for r in records]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def pointer(run):
    return (run / "checkpoints" / SAMPLING).read_text().strip()


def ema_of(path):
    return torch.load(path, weights_only=True)["ema"]


def assert_holds_ema(nets, ema):
    for net in ("G_E", "F", "phi"):
        for k, v in nets[net].state_dict().items():
            assert torch.equal(v, ema[net][k]), (net, k)


WORSE = {"ae": {"l1": 0.2, "psnr": 14.0}, "embed": {"swd": 41.5, "msssim": 0.2},
         "finetune": {"swd": 87.25, "msssim": 0.3}}


@pytest.fixture(scope="module")
def worse_run(tmp_path_factory):
    """One run whose finetune stage made SWD worse, shared by the tests that only read it."""
    return run_with_figures(tmp_path_factory.mktemp("worse"), WORSE)


def test_a_worse_finetune_warns_naming_both_figures_and_records_why(worse_run):
    run, messages = worse_run
    warnings = [m for level, m in messages if level == logging.WARNING and "worse" in m]
    assert len(warnings) == 1 and "87.25" in warnings[0] and "41.5" in warnings[0], messages
    kept = [r for r in rows(run) if "kept" in r]
    assert len(kept) == 1
    assert kept[0]["stage"] == "finetune" and kept[0]["kept"] == "embed"
    assert kept[0]["checkpoint"] == "stage-embed.pt" and kept[0]["swd"] == {"embed": 41.5, "finetune": 87.25}
    assert "87.25" in kept[0]["why"] and "41.5" in kept[0]["why"]
    assert any(level == logging.INFO and "stage-embed.pt" in m for level, m in messages)
    assert "stage-embed.pt" in sampling_summary(run) and "worse" in sampling_summary(run)


def test_sampling_a_run_loads_the_kept_stage_and_a_file_as_given(worse_run, caplog):
    run, _ = worse_run
    assert pointer(run) == "stage-embed.pt"
    folder = run / "checkpoints"
    embed, finetune = ema_of(folder / "stage-embed.pt"), ema_of(folder / "stage-finetune.pt")
    assert any(not torch.equal(v, finetune["G_E"][k]) for k, v in embed["G_E"].items())  # finetune moved them
    assert load_checkpoint(run)["counters"]["stage"] == "done"  # resuming still reads latest
    with caplog.at_level(logging.INFO):
        _, nets = load_sampling_nets(run)
    assert_holds_ema(nets, embed)
    assert any(str(folder / "stage-embed.pt") in r.getMessage() for r in caplog.records)  # says which file
    assert resolve_checkpoint(run) == folder / "stage-embed.pt"  # eval and export go the same way
    _, nets = load_sampling_nets(folder / "stage-finetune.pt")
    assert_holds_ema(nets, finetune)


def test_losses_png_carries_the_stage_end_figures(worse_run, tmp_path):
    run, _ = worse_run
    assert (run / "losses.png").stat().st_size > 1000
    shown = plot_metrics(run / "metrics.jsonl", tmp_path / "losses.png")
    assert shown["eval"] == {"swd": {"embed": 41.5, "finetune": 87.25}, "msssim": {"embed": 0.2, "finetune": 0.3},
                             "psnr": {"ae": 14.0}, "l1": {"ae": 0.2}}
    assert shown["kept"] == "embed"
    assert (tmp_path / "losses.png").stat().st_size > (run / "losses.png").stat().st_size // 2


def test_the_plot_shows_a_stage_evaluated_twice_by_its_last_figures(tmp_path):
    lines = [{"stage": "ae", "kimg": 1, "losses": {"H": 1.0}, "img_per_s": 10},
             {"stage": "embed", "kimg": 2, "eval": {"swd": 90.0, "swd_16": 3.0}},
             {"stage": "embed", "kimg": 2, "eval": {"swd": 70.0, "swd_16": 2.0}}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "fin')
    shown = plot_metrics(tmp_path / "m.jsonl", tmp_path / "l.png")
    assert shown == {"eval": {"swd": {"embed": 70.0}}, "kept": None} and (tmp_path / "l.png").is_file()


@pytest.mark.parametrize("damage", ["corrupt", "elsewhere", "uncommitted", "empty"])
def test_a_pointer_that_cannot_be_followed_falls_back_to_latest_with_a_warning(worse_run, tmp_path, caplog, damage):
    run = tmp_path / "run"
    shutil.copytree(worse_run[0], run)
    folder = run / "checkpoints"
    latest_ema = ema_of(folder / "stage-finetune.pt")
    if damage == "corrupt":
        data = bytearray((folder / "stage-embed.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "stage-embed.pt").write_bytes(bytes(data))
    elif damage == "elsewhere":
        (folder / SAMPLING).write_text(f"../{folder.name}/stage-embed.pt\n")
    elif damage == "uncommitted":
        shutil.copy(folder / "stage-embed.pt", folder / "stage-other.pt")
        (folder / SAMPLING).write_text("stage-other.pt\n")
    else:
        (folder / SAMPLING).write_text("\n")
    with caplog.at_level(logging.INFO):
        _, nets = load_sampling_nets(run)
    assert_holds_ema(nets, latest_ema)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "latest" in warned[0] and "stage-finetune.pt" in warned[0], warned
    caplog.clear()
    assert resolve_checkpoint(run) == folder / "stage-finetune.pt"
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_a_better_finetune_is_kept_without_a_warning(tmp_path):
    figures = dict(WORSE, finetune={"swd": 30.0, "msssim": 0.3})
    run, messages = run_with_figures(tmp_path, figures)
    assert pointer(run) == "stage-finetune.pt"
    assert not [m for level, m in messages if level >= logging.WARNING], messages
    (kept,) = [r for r in rows(run) if "kept" in r]
    assert kept["kept"] == "finetune" and "30" in kept["why"] and "41.5" in kept["why"]
    assert resolve_checkpoint(run) == run / "checkpoints" / "stage-finetune.pt"


def test_without_swd_the_latest_is_kept_saying_why(tmp_path):
    figures = {s: {k: v for k, v in f.items() if k != "swd"} for s, f in WORSE.items()}
    run, messages = run_with_figures(tmp_path, figures, eval_metrics=("msssim",))
    assert pointer(run) == "stage-finetune.pt"
    (kept,) = [r for r in rows(run) if "kept" in r]
    assert kept["kept"] == "finetune" and "not among --eval-metrics" in kept["why"]
    assert any(level == logging.INFO and "not among --eval-metrics" in m for level, m in messages)


def test_a_stage_without_an_swd_figure_keeps_the_latest(tmp_path):
    figures = dict(WORSE, finetune={})  # finetune's evaluation gave nothing
    run, _ = run_with_figures(tmp_path, figures)
    assert pointer(run) == "stage-finetune.pt"
    (kept,) = [r for r in rows(run) if "kept" in r]
    assert "finetune has no SWD" in kept["why"]


def test_a_resumed_finetune_compares_with_embed_from_before_the_resume(tmp_path):
    steps = int(KIMG["ae"] * 1000) // 4 + int(KIMG["embed"] * 1000) // 4 + 1  # one step into finetune
    run, _ = run_with_figures(tmp_path, WORSE, stop_after_steps=steps)
    assert load_checkpoint(run)["counters"]["stage"] == "finetune" and not (run / "checkpoints" / SAMPLING).exists()
    run, messages = run_with_figures(tmp_path, {"finetune": WORSE["finetune"]}, resume=True)
    assert any(level == logging.WARNING and "87.25" in m and "41.5" in m for level, m in messages)
    assert pointer(run) == "stage-embed.pt"
    (kept,) = [r for r in rows(run) if "kept" in r]
    assert kept["swd"] == {"embed": 41.5, "finetune": 87.25}


def test_a_run_killed_while_saving_a_worse_stage_already_samples_the_better_one(tmp_path):
    """The pointer to an earlier stage is written before the worse stage's own checkpoint: a run that
    dies in that save (here: the save raises) is done training and never re-decides."""
    real_save = loop_module.save_run

    def dying_save(st, run_dir, loader, name=None):
        if name == "stage-finetune.pt":
            raise RuntimeError("killed while saving stage-finetune.pt")
        return real_save(st, run_dir, loader, name)

    with pytest.raises(RuntimeError, match="killed"):
        run_with_figures(tmp_path, WORSE, patch=lambda mp: mp.setattr(loop_module, "save_run", dying_save))
    run = tmp_path / "run"
    assert not (run / "checkpoints" / "stage-finetune.pt").exists() and pointer(run) == "stage-embed.pt"
    assert resolve_checkpoint(run) == run / "checkpoints" / "stage-embed.pt"


def test_a_better_stage_gone_from_disk_is_not_pointed_at(tmp_path):
    real_save = loop_module.save_run

    def save_then_lose_embed(st, run_dir, loader, name=None):
        path = real_save(st, run_dir, loader, name)
        if name == "stage-embed.pt":
            path.unlink()  # a user cleaning up, say
        return path

    run, messages = run_with_figures(tmp_path, WORSE, patch=lambda mp: mp.setattr(loop_module, "save_run",
                                                                                   save_then_lose_embed))
    assert pointer(run) == "stage-finetune.pt"
    assert any(level == logging.WARNING and "gone" in m for level, m in messages)
