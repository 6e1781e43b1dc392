"""The op modules and the dispatcher, on the reference backend: identical to nn.BatchNorm2d + act.

Every test here runs inside ``ops.use_backend("reference")`` with the kernel path disabled (the
``reference_only`` fixture), so a module that silently took a kernel would fail, not pass.
"""
import logging
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aegan_fast import ops
from aegan_fast.ops import BatchNormAct2d, BatchNormAddAct2d, dispatch, library


@pytest.fixture
def reference_only(monkeypatch):
    def no_kernel(kernel, *args, **kwargs):
        raise AssertionError(f"kernel {kernel!r} ran where the reference was asked for")
    monkeypatch.setattr(library, "run", no_kernel)
    with ops.use_backend("reference"):
        yield


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
def test_bn_act_matches_nn_batchnorm(reference_only, momentum, activation):
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


def test_bn_add_act_and_state_dict_compat(reference_only):
    ours = BatchNormAddAct2d(4, "relu")
    plain = nn.BatchNorm2d(4)
    plain.load_state_dict(ours.state_dict())  # the same keys, so checkpoints move freely
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(ours(x, r), F.relu(plain(x) + r))


def test_unknown_activation_is_an_error():
    with pytest.raises(ValueError, match="unknown activation"):
        BatchNormAct2d(4, "gelu")
    with pytest.raises(ValueError, match="unknown activation"):
        ops.bn_act(torch.randn(2, 3, 4, 4), None, None, None, None, True, 0.1, 1e-5, "gelu", 0.0)


def test_dispatcher_errors_are_clear():
    with pytest.raises(ValueError, match="unknown ops backend"):
        with ops.use_backend("fastest"):
            pass
    reasons = ops.availability()
    assert reasons["reference"] is None
    assert set(reasons) == set(ops.BACKENDS)
    for name, reason in reasons.items():
        if reason is not None:  # an unavailable backend says why, and asking for it is an error on entering
            with pytest.raises(ops.BackendUnavailable, match=name):
                with ops.use_backend(name):
                    pytest.fail("entered the context of an unavailable backend")


def test_explicit_reference_backend(reference_only):
    assert ops.resolve("cpu") == "reference"
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ops.bn_act(x, None, None, None, None, True, 0.1, 1e-5, "relu", 0.0),
                               F.relu(F.batch_norm(x, None, None, training=True)))


def test_use_backend_is_scoped():
    """A context variable: restored on exit (even by an exception), nested scopes stack, and a
    thread started inside does not inherit the caller's choice."""
    outer = ops.requested()
    with ops.use_backend("reference"):
        assert ops.requested() == "reference"
        seen = []
        t = threading.Thread(target=lambda: seen.append(ops.requested()))
        t.start(), t.join()
        assert seen == [outer]
        with pytest.raises(KeyError):
            with ops.use_backend("auto"):
                assert ops.requested() == "auto"
                raise KeyError
        assert ops.requested() == "reference"
    assert ops.requested() == outer
    assert not hasattr(ops, "set_backend") and not hasattr(ops, "get_backend")


def _fake_adapter(name, devices):
    return library.Adapter(name, devices, forward=None, backward=None)


def test_explicit_backend_on_the_wrong_device_is_an_error(monkeypatch):
    monkeypatch.setitem(library._adapters, "cuda", _fake_adapter("cuda", ("cuda",)))
    with pytest.raises(ops.BackendUnavailable, match="cannot run on cpu"):
        ops.resolve("cpu", backend="cuda")


def test_auto_fallback_warns_once_with_the_reason(monkeypatch, caplog):
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ("cuda",))
    monkeypatch.setitem(library._adapters, "cuda", "not built (no nvcc here)")
    monkeypatch.setattr(dispatch, "_warned", set())
    x = torch.randn(1, 3, 64, 64)  # above auto's size threshold: a kernel would be wanted
    with ops.use_backend("auto"), caplog.at_level(logging.WARNING, logger="aegan_fast.ops"):
        for _ in range(3):
            ops.bn_act(x, None, None, None, None, True, 0.1, 1e-5, "relu", 0.0)
        BatchNormAct2d(3)(x)
    warnings = [r for r in caplog.records if "no fast backend" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "cuda: not built (no nvcc here)" in warnings[0].getMessage()


def test_auto_takes_reference_below_the_threshold(monkeypatch):
    monkeypatch.setitem(library._adapters, "cpp", _fake_adapter("cpp", ("cpu",)))
    limit = dispatch.AUTO_MIN_PER_CHANNEL["cpu"]
    assert limit > 0  # the measured CPU crossover is in force
    assert ops.resolve("cpu", limit - 1, backend="auto") == "reference"
    assert ops.resolve("cpu", limit, backend="auto") == "cpp"
    assert ops.resolve("cpu", 10, backend="cpp") == "cpp"  # an explicit choice is never overridden
    # the functional entry and the modules count values per channel (N*H*W), not per call
    calls = []
    monkeypatch.setattr(library, "run", lambda kernel, *a: calls.append(kernel) or a[0])
    with ops.use_backend("auto"):
        big_c = torch.randn(2, limit, 2, 2)  # 4*limit values per call, 8 per channel
        ops.bn_act(big_c, None, None, None, None, True, 0.1, 1e-5, "relu", 0.0)
        BatchNormAct2d(1)(torch.randn(1, 1, 1, limit))
    assert calls == ["cpp"], calls


def test_module_resolves_once_per_device_and_request(monkeypatch):
    calls = []
    real = dispatch.resolve

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "resolve", counting)
    bn = BatchNormAct2d(3)
    x = torch.randn(2, 3, 4, 4)
    with ops.use_backend("reference"):
        for _ in range(4):
            bn(x)
    assert len(calls) == 1
    with ops.use_backend("auto"):
        bn(x), bn(x)
    assert len(calls) == 2
