"""The fused block ops (aegan_fast/ops/blocks.py): models.ResBlock and the transposed up block as one op.

The parity cases (fused vs the stock block on the reference backend, loaded from one stock-module
state_dict: output, every gradient, running statistics and num_batches_tracked after two training
steps, eval mode; N3 C5 7x9 and C64; NCHW and channels_last; relu, leaky_relu, identity; fp32 and
bf16; the dispatch rules: auto never fused, explicit triton fused, an error on a device it cannot
run on, per-op inside sync_batchnorm with two ranks and for inputs the kernels do not take; saved
tensors; not twice differentiable; opcheck) live in blocks_interp_worker.py and run in one child
process with TRITON_INTERPRET=1 (interp_harness.py says why and how). The cases here run in this
process, without the interpreter.
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

from aegan_fast import models, ops
from interp_harness import needs_triton, parity_tests

WORKER = Path(__file__).resolve().parent / "blocks_interp_worker.py"
# One block of each kind in the fast tier: between them they run every Triton kernel (conv3x3, convt4x4,
# the BatchNorm passes) through the host layer, in a few seconds.
interp_results, test_blocks_interpreter = parity_tests(WORKER, fast=("resblock-identity-nchw-fp32-momentum_none",
                                                                     "up_block-nchw-fp32-momentum_none"))


def _eligible():
    """An input and conv weight the block op takes (fp32, 4-D, H and W >= 2)."""
    return torch.randn(2, 5, 6, 7), torch.randn(5, 5, 3, 3)


def test_auto_takes_the_per_op_path():
    """No GPU measurement of the blocks yet: auto never names a block kernel, on any device, even
    for an input the block op takes; the ResBlock then runs its modules."""
    x, w = _eligible()
    for dev in ("cpu", "meta"):
        with ops.use_backend("auto"):
            assert ops.block_kernel(x.to(dev), "relu", w.to(dev)) is None
    block = models.ResBlock(5, "relu")
    with ops.use_backend("auto"):
        y = block(x)
    assert y.shape == x.shape


def test_block_kernel_rules(monkeypatch):
    """An explicit block kernel runs the block op on an input it takes and hands every other input
    to the per-op path (None), one rule at a time. The backend's own availability is stubbed out
    (it needs a GPU or the interpreter): these are the rules that look at the input."""
    from aegan_fast.ops import dispatch, sync_bn
    monkeypatch.setattr(dispatch, "resolve", lambda *args, **kwargs: "triton")
    x, w = _eligible()
    assert ops.block_kernel(x, "relu", w, backend="triton") == "triton"
    assert ops.block_kernel(x.bfloat16(), "leaky_relu", w.bfloat16(), backend="triton") == "triton"
    for why, args in (("3-D input", (x[0], "relu", w)), ("H = 1", (x[:, :, :1], "relu", w)),
                      ("W = 1", (x[..., :1], "relu", w)), ("unknown activation", (x, "gelu", w)),
                      ("fp64", (x.double(), "relu", w.double())),
                      ("weight in another dtype", (x, "relu", w.bfloat16())),
                      ("weight on another device", (x, "relu", w.to("meta")))):
        assert ops.block_kernel(*args, backend="triton") is None, why
    with torch.autocast("cpu"):
        assert ops.block_kernel(x, "relu", w, backend="triton") is None, "autocast"
    monkeypatch.setattr(sync_bn, "enabled", lambda: True)
    assert ops.block_kernel(x, "relu", w, backend="triton") is None, "sync_batchnorm with several ranks"


@needs_triton
def test_explicit_triton_without_a_gpu_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: triton runs there")
    with pytest.raises(ops.BackendUnavailable, match="no CUDA device"):
        ops.block_kernel(torch.randn(2, 5, 6, 7), "relu", backend="triton")


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown ops backend"):
        ops.block_kernel(torch.randn(2, 5, 6, 7), "relu", backend="tritonn")


def _stock_resblock(c):
    """The block as stock modules: the layout of every checkpoint saved before the fused path."""
    m = nn.Module()
    m.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False, padding_mode="reflect")
    m.bn1 = nn.BatchNorm2d(c)
    m.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False, padding_mode="reflect")
    m.bn2 = nn.BatchNorm2d(c)
    return m


@pytest.mark.parametrize("kind", ["res", "up-transposed", "up-resize_conv"])
def test_checkpoints_load_unchanged(kind):
    """A state_dict saved by the stock modules loads (strict) into the block and back, keys identical."""
    if kind == "res":
        old, new = _stock_resblock(4), models.ResBlock(4, "leaky_relu")
    else:
        up = kind.split("-")[1]
        conv = models.upsample_conv(4, 3, up, bias=False)
        old, new = nn.Sequential(conv, nn.BatchNorm2d(3)), models._up(4, 3, up)
    with torch.no_grad():
        for t in old.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape))
    buf = io.BytesIO()
    torch.save(old.state_dict(), buf)
    buf.seek(0)
    new.load_state_dict(torch.load(buf), strict=True)
    assert list(new.state_dict()) == list(old.state_dict())
    for k, v in old.state_dict().items():
        assert torch.equal(new.state_dict()[k], v), k
    old.load_state_dict(new.state_dict(), strict=True)
