"""The divergence guard: non-finite updates are skipped, a run that keeps producing them goes back to
its last good checkpoint with lower learning rates, and no checkpoint ever holds a NaN."""
import json

import pytest
import torch

from aegan_fast import losses, precision
from aegan_fast.checkpoint import first_nonfinite, load_checkpoint
from aegan_fast.data import load_folder
from aegan_fast.errors import UserError
from aegan_fast.guard import UpdateGuard
from aegan_fast.training import train
from conftest import tiny_config


def _tiny_model():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    return net, torch.optim.Adam(net.parameters(), lr=1e-2, fused=True)


def _update(net, opt, guard, poison: bool):
    x = torch.randn(9, 5)
    loss = net(x).square().mean() * (float("nan") if poison else 1.0)
    with precision.steps_in(precision.FP32, None, guard):
        precision.backward_and_step(loss, [opt])
    guard.end_step()


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_update_leaves_weights_and_adam_state_untouched(fused):
    net, opt = _tiny_model()
    if not fused:
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    guard = UpdateGuard("cpu")
    _update(net, opt, guard, poison=False)          # Adam's state exists from here on
    before = {k: v.clone() for k, v in net.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["state"].items()}
    _update(net, opt, guard, poison=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(v, moments[i][k]), (i, k)
    assert guard.read() == (1, 1)
    _update(net, opt, guard, poison=False)          # a finite update after it is applied again
    assert any(not torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert guard.read() == (0, 0)


def test_bad_steps_in_a_row_are_counted_and_a_good_step_ends_the_run():
    net, opt = _tiny_model()
    guard = UpdateGuard("cpu")
    for poison in (True, True, False, True, True, True, False):
        _update(net, opt, guard, poison)
    assert guard.read() == (5, 3)       # 5 skipped, the longest run 3 steps
    _update(net, opt, guard, poison=True)
    assert guard.read() == (1, 1)


class _Poison:
    """losses.g_loss returning NaN for calls number first..last (1-based) of the run."""

    def __init__(self, monkeypatch, first, last):
        self.calls, self.first, self.last = 0, first, last
        real = losses.g_loss

        def g_loss(kind, logits):
            self.calls += 1
            out = real(kind, logits)
            return out * float("nan") if self.first <= self.calls <= self.last else out

        monkeypatch.setattr(losses, "g_loss", g_loss)


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _all_checkpoints_finite(run):
    files = sorted((run / "checkpoints").glob("*.pt"))
    assert files
    for f in files:
        assert first_nonfinite(load_checkpoint(f)) is None, f.name


def test_a_transient_nan_is_skipped_logged_and_never_saved(tmp_path, image_folder, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    _Poison(monkeypatch, first=2, last=3)  # two of stage 2's generator updates
    cfg = tiny_config(log_every_steps=1)
    train(cfg, run, progress=False, data=load_folder(image_folder, 64))
    skipped = sum(r.get("skipped_updates", 0) for r in _rows(run) if "losses" in r)
    assert skipped == 2
    state = load_checkpoint(run)
    assert state["counters"]["total_img"] == 3 * 16 and state["health"] == {"lr_scale": 1.0, "rollbacks": 0}
    _all_checkpoints_finite(run)


def test_a_run_that_keeps_diverging_rolls_back_with_a_lower_learning_rate(tmp_path, image_folder, monkeypatch,
                                                                          caplog):
    """NaNs from the 2nd generator update on, for 3 steps: the guard skips them, and at 2 bad steps in
    a row the run goes back to stage-ae.pt with half the learning rates, then finishes."""
    run = tmp_path / "run"
    run.mkdir()
    poison = _Poison(monkeypatch, first=2, last=4)
    cfg = tiny_config(log_every_steps=1, max_bad_steps=2, rollback_lr_scale=0.5)
    with caplog.at_level("WARNING"):
        train(cfg, run, progress=False, data=load_folder(image_folder, 64))
    assert poison.calls > 4
    assert any("diverged" in r.message and "stage-ae.pt" in r.message for r in caplog.records)
    state = load_checkpoint(run)
    assert state["health"] == {"lr_scale": 0.5, "rollbacks": 1}
    assert state["counters"]["total_img"] == 3 * 16
    lr = state["opts"]["G_E"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(cfg.lr["G_E"] * cfg.finetune_lr_scale * 0.5)
    _all_checkpoints_finite(run)


def test_a_run_that_diverges_past_its_rollbacks_stops_with_a_clear_error(tmp_path, image_folder, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    _Poison(monkeypatch, first=1, last=10 ** 9)
    cfg = tiny_config(log_every_steps=1, max_bad_steps=2, max_rollbacks=1)
    with pytest.raises(UserError, match="diverged again.*1 rollbacks.*stage-ae.pt"):
        train(cfg, run, progress=False, data=load_folder(image_folder, 64))
    _all_checkpoints_finite(run)
