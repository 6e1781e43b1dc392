"""The op modules and the dispatcher, on the reference backend: identical to nn.BatchNorm2d + act."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aegan_fast import ops
from aegan_fast.ops import BatchNormAct2d, BatchNormAddAct2d


def _pair(momentum, activation, slope=0.2):
    torch.manual_seed(1)
    ours = BatchNormAct2d(5, activation, slope, momentum=momentum)
    plain = nn.BatchNorm2d(5, momentum=momentum)
    with torch.no_grad():
        ours.weight.normal_(1, 0.3)
        ours.bias.normal_(0, 0.3)
    plain.load_state_dict(ours.state_dict())
    act = {"relu": F.relu, "leaky_relu": lambda y: F.leaky_relu(y, slope), "identity": lambda y: y}[activation]
    return ours, lambda x: act(plain(x)), plain


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu"])
def test_bn_act_matches_nn_batchnorm(momentum, activation):
    ours, plain_fn, plain = _pair(momentum, activation)
    for step in range(3):  # running statistics accumulate identically over several steps
        x = torch.randn(3, 5, 7, 9, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y, y2 = ours(x), plain_fn(x2)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)
        g = torch.randn_like(y)
        y.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad)
    torch.testing.assert_close(ours.running_mean, plain.running_mean)
    torch.testing.assert_close(ours.running_var, plain.running_var)
    assert ours.num_batches_tracked == plain.num_batches_tracked == 3
    ours.eval(), plain.eval()
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(ours(x), plain_fn(x))


def test_bn_add_act_and_state_dict_compat():
    ours = BatchNormAddAct2d(4, "relu")
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(ours.state_dict())  # the same keys, so checkpoints move freely
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(ours(x, r), F.relu(plain(x) + r))


def test_memory_efficient_needs_invertible_activation():
    with pytest.raises(ValueError, match="invertible"):
        BatchNormAct2d(4, "relu", memory_efficient=True)
    BatchNormAct2d(4, "leaky_relu", 0.2, memory_efficient=True)


def test_dispatcher_errors_are_clear():
    with pytest.raises(ValueError, match="unknown ops backend"):
        ops.set_backend("fastest")
    reasons = ops.availability()
    assert reasons["reference"] is None
    for name, reason in reasons.items():
        if reason is not None:  # an unavailable backend says why, and asking for it is an error
            with pytest.raises(ops.BackendUnavailable, match=name):
                ops.set_backend(name)


def test_explicit_reference_backend():
    previous = ops.get_backend()
    ops.set_backend("reference")
    try:
        assert ops.resolve("cpu").name == "reference"
    finally:
        ops.set_backend(previous)
