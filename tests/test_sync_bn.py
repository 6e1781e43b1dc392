"""Synchronized BatchNorm (ops.sync_batchnorm) against ONE process running nn.BatchNorm2d on the
concatenated global batch, in fp64.

Each group of cases runs in one set of spawned gloo processes (spawning costs seconds, a case
milliseconds): every rank builds the same global batch from a seed, takes its slice (uneven, and
empty on some rank), runs our module in training mode under ops.sync_batchnorm() with the loss
sum(out * g), and checks against the fp64 truth computed in-process: the output and grad x of its
slice, grad residual, the running statistics (and that every rank's buffers are bit-identical),
and grad weight/bias as the SUM over ranks of the local ones (the trainer averages parameter
gradients afterwards, like DDP). The collective timeout is 60 s, so a hung rank fails the test.

Tolerances: fp32 is 1e-5 of each tensor's scale (ops_parity.close), as for the single-process
kernels: the merge adds at most a few fp64 roundings. bf16 (inputs, residual and grad_out in bf16,
parameters fp32, the trainer's path) is judged against fp32-exact truth on the same rounded inputs:
outputs and grads are stored in bf16 (one rounding, 2^-8 relative; grad x rounds twice, once in
the eval-mode kernel and once after the correction), so 8e-3 of scale, the bound the other bf16
parity tests use; the running statistics come from an fp32 copy and keep fp32's 1e-5.
"""
from __future__ import annotations

import datetime
import importlib.util
import itertools
import json
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
C, H, W = 3, 5, 5  # odd on purpose
ACTS = ("identity", "relu", "leaky_relu")
OPS = ("bn_act", "bn_add_act")


def _grid(kernels, dtypes, layouts, op_acts, splits):
    cases = {}
    for kernel, dtype, layout, (op, act), split in itertools.product(kernels, dtypes, layouts, op_acts, splits):
        cases[f"{kernel}-{dtype}-{layout}-{op}-{act}-split{'_'.join(map(str, split))}"] = dict(
            kernel=kernel, dtype=dtype, layout=layout, op=op, act=act, split=split)
    return cases


ALL_OP_ACTS = list(itertools.product(OPS, ACTS))
GROUPS = {
    # every kernel that loads on CPU x fp32/bf16 x both layouts x both ops x every activation;
    # per-rank batches 1/2/3, uneven, and an empty rank on either side
    "world2": dict(world=2, cases={
        **_grid(("reference", "cpp"), ("float32", "bfloat16"), ("nchw", "channels_last"), ALL_OP_ACTS,
                ((1, 2), (3, 3), (0, 3), (2, 0))),
        # one value per channel on rank 0 (a plain BatchNorm there alone would refuse it), three globally
        # (with two, x̂ = ±1 whatever x is: grad x is exactly 0 and only rounding noise would be compared)
        **{f"{k}-1x1-map-split1_2": dict(kernel=k, dtype="float32", layout="nchw", op="bn_act", act="leaky_relu",
                                         split=(1, 2), hw=(1, 1)) for k in ("reference", "cpp")},
        **{f"special-{name}": dict(special=name) for name in (
            "eval_makes_no_collective", "outside_context_makes_no_collective", "one_value_in_global_batch",
            "single_rank_group_is_unsynced", "momentum_none_three_steps", "two_forwards_one_backward")},
    }),
    "world3": dict(world=3, cases={
        **_grid(("reference", "cpp"), ("float32",), ("nchw", "channels_last"),
                (("bn_act", "leaky_relu"), ("bn_add_act", "relu"), ("bn_add_act", "identity")),
                ((1, 2, 3), (2, 0, 1))),
        **_grid(("cpp",), ("bfloat16",), ("channels_last",), (("bn_add_act", "leaky_relu"),), ((3, 1, 0),)),
        "special-subgroup_of_two": dict(special="subgroup_of_two"),
    }),
    # the Triton kernels under the interpreter (TRITON_INTERPRET=1 set for the spawned ranks only)
    "triton": dict(world=2, interpret=True, cases={
        **_grid(("triton",), ("float32",), ("nchw", "channels_last"),
                (("bn_act", "leaky_relu"), ("bn_add_act", "relu"), ("bn_add_act", "identity")), ((1, 2), (0, 3))),
        **_grid(("triton",), ("bfloat16",), ("channels_last",), (("bn_add_act", "leaky_relu"),), ((2, 1),)),
    }),
}
HAVE_TRITON = importlib.util.find_spec("triton") is not None


# ----------------------------------------------------------------------------------------------
# the ranks (spawned)
# ----------------------------------------------------------------------------------------------

def _data(case, seed):
    """The global batch and parameters, identical on every rank (one generator, one seed)."""
    from ops_parity import away_from_kink

    dtype = getattr(torch, case.get("dtype", "float32"))
    hw = case.get("hw", (H, W))
    n = sum(case["split"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, *hw, generator=g, dtype=torch.float64) * 2 + 0.5
    r = torch.randn(n, C, *hw, generator=g, dtype=torch.float64)
    dy = torch.randn(n, C, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(C, generator=g, dtype=torch.float64) * 0.5 + 1
    b = torch.randn(C, generator=g, dtype=torch.float64) * 0.5
    rm = torch.randn(C, generator=g, dtype=torch.float64) * 0.3
    rv = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    if case.get("act", "identity") != "identity":
        # bf16 rounding moves the pre-activation by up to ~1e-2 here: keep every value further from the kink
        gap = 0.05 if dtype == torch.bfloat16 else 1e-3
        x, r = away_from_kink(case["op"], x, r, w, b, rm, rv, True, gap=gap)
    # every side sees the same rounded inputs; parameters and buffers stay fp32 (the trainer's bf16 path)
    rnd = lambda t: t.to(dtype).double()  # noqa: E731
    return dict(x=rnd(x), r=rnd(r), dy=rnd(dy), w=w.float().double(), b=b.float().double(),
                rm=rm.float().double(), rv=rv.float().double(), dtype=dtype)


def _truth(case, d, momentum=0.1):
    """nn.BatchNorm2d + activation (+ residual) on the whole batch, fp64, one process."""
    import torch.nn.functional as F
    bn = torch.nn.BatchNorm2d(C, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(d["w"]), bn.bias.copy_(d["b"]), bn.running_mean.copy_(d["rm"]), bn.running_var.copy_(d["rv"])
    x = d["x"].clone().requires_grad_()
    r = d["r"].clone().requires_grad_()
    z = bn(x)
    if case["op"] == "bn_add_act":
        z = z + r
    out = {"identity": lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2)}[case["act"]](z)
    (out * d["dy"]).sum().backward()
    return dict(out=out.detach(), grad_x=x.grad, grad_residual=r.grad if case["op"] == "bn_add_act" else None,
                grad_weight=bn.weight.grad, grad_bias=bn.bias.grad, running_mean=bn.running_mean,
                running_var=bn.running_var)


def _ours(case, d, rank, momentum=0.1, group=None, module=None, sync=True):
    """Our module on this rank's slice, in training mode under ops.sync_batchnorm(group) (or outside it)."""
    from aegan_fast import ops
    lo = sum(case["split"][:rank])
    sl = slice(lo, lo + case["split"][rank])
    fmt = torch.channels_last if case.get("layout") == "channels_last" else torch.contiguous_format
    local = lambda t: t[sl].to(d["dtype"]).contiguous(memory_format=fmt)  # noqa: E731
    add = case["op"] == "bn_add_act"
    if module is None:
        module = (ops.BatchNormAddAct2d if add else ops.BatchNormAct2d)(C, case["act"], 0.2, momentum=momentum)
        with torch.no_grad():
            for name in ("weight", "bias"):
                getattr(module, name).copy_(d[name[0]])
            module.running_mean.copy_(d["rm"]), module.running_var.copy_(d["rv"])
    module.train()
    x = local(d["x"]).requires_grad_()
    r = local(d["r"]).requires_grad_()
    with ops.use_backend(case.get("kernel", "reference")), (ops.sync_batchnorm(group) if sync else nullcontext()):
        out = module(x, r) if add else module(x)
    if out.shape != x.shape or out.dtype != d["dtype"]:
        raise AssertionError(f"output {tuple(out.shape)} {out.dtype}, input {tuple(x.shape)} {d['dtype']}")
    if x.numel() and case.get("layout") == "channels_last" and not out.is_contiguous(memory_format=torch.channels_last):
        raise AssertionError("channels_last input gave an output in another memory format")
    module.weight.grad = module.bias.grad = None
    (out * local(d["dy"])).sum().backward()  # outside the block: the backward syncs all the same
    return module, sl, dict(out=out.detach(), grad_x=x.grad, grad_residual=r.grad if add else None,
                            grad_weight=module.weight.grad, grad_bias=module.bias.grad,
                            running_mean=module.running_mean, running_var=module.running_var)


def _summed(t, group=None):
    import torch.distributed as dist
    t = t.detach().double().clone()
    dist.all_reduce(t, group=group)
    return t


def _identical_on_every_rank(name, t, world, group=None):
    import torch.distributed as dist
    every = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(every, t.detach().contiguous(), group=group)
    if not all(torch.equal(e, every[0]) for e in every):
        raise AssertionError(f"{name} differs between ranks: {[e.tolist() for e in every]}")


def _compare(case, got, want, sl, world, group=None):
    from ops_parity import close
    low = getattr(torch, case.get("dtype", "float32")) != torch.float32
    rtol = 8e-3 if low else 1e-5
    for k in ("grad_weight", "grad_bias"):  # the sums over ranks of the local grads
        close(_summed(got[k], group), want[k], rtol, k)
    for k in ("running_mean", "running_var"):
        _identical_on_every_rank(k, got[k], world, group)
        close(got[k], want[k], 1e-5, k)
    for k in ("out", "grad_x", "grad_residual"):
        if want[k] is None:
            if got[k] is not None:
                raise AssertionError(f"{k}: expected None")
            continue
        _close_slice(k, got[k], want[k], sl, rtol)


def _close_slice(name, got, want, sl, rtol):
    """This rank's slice of a per-element tensor, with atol from the WHOLE tensor's scale (what
    ops_parity.close uses for the whole tensor: a slice may hold only small values)."""
    if tuple(got.shape) != tuple(want[sl].shape):
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, expected {tuple(want[sl].shape)}")
    if got.numel():
        if not torch.isfinite(got).all():
            raise AssertionError(f"{name}: non-finite values")
        torch.testing.assert_close(got.double(), want[sl], rtol=rtol, atol=rtol * want.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def _run_case(case, rank, world, seed):
    import torch.distributed as dist
    if "special" in case:
        return globals()["_special_" + case["special"]](rank, world)
    from aegan_fast.ops import library
    if case["kernel"] != "reference":
        a = library.load(case["kernel"])
        if isinstance(a, str):
            return f"skip: kernel {case['kernel']} unavailable here: {a}"
    d = _data(case, seed)
    _, sl, got = _ours(case, d, rank)
    _compare(case, got, _truth(case, d), sl, world)
    dist.barrier()
    return "ok"


class _Counting:
    """Counts torch.distributed.all_gather / all_reduce calls made while active (sync_bn calls them
    through the module attribute, so patching it sees every call)."""

    def __enter__(self):
        import torch.distributed as dist
        self.calls = []
        self.saved = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}
        for name, fn in self.saved.items():
            setattr(dist, name, lambda *a, _n=name, _f=fn, **k: (self.calls.append(_n), _f(*a, **k))[1])
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _special_eval_makes_no_collective(rank, world):
    """Eval mode under the context: rank 0 evaluates alone while rank 1 waits at a barrier; a
    collective on rank 0 would pair with nothing and time out (or error) instead of completing."""
    import torch.distributed as dist
    from aegan_fast import ops
    m = ops.BatchNormAct2d(C, "leaky_relu", 0.2).eval()
    with torch.no_grad():
        m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 1.5)
    if rank == 0:
        x = torch.randn(2, C, H, W, requires_grad=True)
        with _Counting() as counted, ops.sync_batchnorm():
            out = m(x)
            out.sum().backward()
        if counted.calls:
            raise AssertionError(f"eval mode made collectives: {counted.calls}")
        want = torch.nn.functional.leaky_relu(torch.nn.functional.batch_norm(
            x.detach(), m.running_mean, m.running_var, m.weight.detach(), m.bias.detach(), False), 0.2)
        torch.testing.assert_close(out.detach(), want)
    dist.barrier()
    return "ok"


def _special_outside_context_makes_no_collective(rank, world):
    """Training mode outside ops.sync_batchnorm() (torch.distributed initialised): today's
    behaviour, the local batch's statistics, no collective."""
    from aegan_fast import ops
    torch.manual_seed(rank)
    m, plain = ops.BatchNormAct2d(C, "relu"), torch.nn.BatchNorm2d(C)
    x = torch.randn(2 + rank, C, H, W) * 3 + 1
    with _Counting() as counted:
        out = m(x)
    if counted.calls:
        raise AssertionError(f"made collectives outside the context: {counted.calls}")
    torch.testing.assert_close(out.detach(), torch.relu(plain(x)).detach())
    torch.testing.assert_close(m.running_var, plain.running_var)
    return "ok"


def _special_one_value_in_global_batch(rank, world):
    """One value per channel over all ranks: the same ValueError as nn.BatchNorm2d, on every rank
    (the count is global, so no rank is left waiting), and the ranks go on working afterwards."""
    import torch.distributed as dist
    from aegan_fast import ops
    m = ops.BatchNormAct2d(C, "relu")
    x = torch.randn(1 if rank == 0 else 0, C, 1, 1)
    try:
        with ops.sync_batchnorm():
            m(x)
    except ValueError as e:
        if "more than 1 value per channel" not in str(e):
            raise
    else:
        raise AssertionError("no error for one value per channel over the global batch")
    dist.barrier()
    return "ok"


def _special_single_rank_group_is_unsynced(rank, world):
    """A process group of one rank: exactly the unsynchronized module (its own batch's statistics)."""
    import torch.distributed as dist
    from aegan_fast import ops
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    torch.manual_seed(10 + rank)
    m, plain = ops.BatchNormAct2d(C, "identity"), torch.nn.BatchNorm2d(C)
    x = torch.randn(3, C, H, W) * 2 - 1
    with _Counting() as counted, ops.sync_batchnorm(groups[rank]):
        out = m(x)
    if counted.calls:
        raise AssertionError(f"a one-rank group made collectives: {counted.calls}")
    torch.testing.assert_close(out.detach(), plain(x).detach())
    torch.testing.assert_close(m.running_mean, plain.running_mean)
    dist.barrier()
    return "ok"


def _special_momentum_none_three_steps(rank, world):
    """momentum=None (cumulative average, factor 1/num_batches_tracked) over three synced steps,
    a new global batch each step, one module kept across them: nn.BatchNorm2d's outputs, running
    statistics and num_batches_tracked on the concatenated batches."""
    import torch.nn.functional as F
    case = dict(kernel="cpp", dtype="float32", layout="channels_last", op="bn_act", act="leaky_relu", split=(1, 2))
    module, bn = None, torch.nn.BatchNorm2d(C, momentum=None).double()
    for step in range(3):
        d = _data(case, 100 + step)
        if module is None:  # both start from step 0's parameters and buffers
            with torch.no_grad():
                bn.weight.copy_(d["w"]), bn.bias.copy_(d["b"]), bn.running_mean.copy_(d["rm"])
                bn.running_var.copy_(d["rv"])
        module, sl, got = _ours(case, d, rank, momentum=None, module=module)
        _close_slice("out", got["out"], F.leaky_relu(bn(d["x"]), 0.2).detach(), sl, 1e-5)
    from ops_parity import close
    if int(module.num_batches_tracked) != 3 or int(bn.num_batches_tracked) != 3:
        raise AssertionError(f"num_batches_tracked {int(module.num_batches_tracked)}, expected 3")
    close(module.running_mean, bn.running_mean, 1e-5, "running_mean")
    close(module.running_var, bn.running_var, 1e-5, "running_var")
    _identical_on_every_rank("running_var", module.running_var, world)
    return "ok"


def _special_two_forwards_one_backward(rank, world):
    """The GAN pattern: one module called on two batches (real, fake: each its own uneven split)
    before one backward of the summed loss; each call syncs its own statistics and updates the
    running ones, as nn.BatchNorm2d called twice on the concatenated batches."""
    import torch.nn.functional as F
    from aegan_fast import ops
    cases = [dict(op="bn_act", act="leaky_relu", split=(2, 1)), dict(op="bn_act", act="leaky_relu", split=(1, 3))]
    ds = [_data(c, 200 + i) for i, c in enumerate(cases)]
    m, bn = ops.BatchNormAct2d(C, "leaky_relu", 0.2), torch.nn.BatchNorm2d(C).double()
    with torch.no_grad():
        for mod in (m, bn):
            mod.weight.copy_(ds[0]["w"]), mod.bias.copy_(ds[0]["b"])
    xs, outs, sls, truth = [], [], [], 0
    with ops.use_backend("cpp"), ops.sync_batchnorm():
        for c, d in zip(cases, ds):
            lo = sum(c["split"][:rank])
            sls.append(slice(lo, lo + c["split"][rank]))
            xs.append(d["x"][sls[-1]].float().requires_grad_())
            outs.append(m(xs[-1]))
    sum((o * d["dy"][sl].float()).sum() for o, d, sl in zip(outs, ds, sls)).backward()
    x64 = [d["x"].clone().requires_grad_() for d in ds]
    want = [F.leaky_relu(bn(x), 0.2) for x in x64]
    sum((o * d["dy"]).sum() for o, d in zip(want, ds)).backward()
    for i in range(2):
        _close_slice(f"out{i}", outs[i].detach(), want[i].detach(), sls[i], 1e-5)
        _close_slice(f"grad_x{i}", xs[i].grad, x64[i].grad, sls[i], 1e-5)
    from ops_parity import close
    close(_summed(m.weight.grad), bn.weight.grad, 1e-5, "grad_weight")
    close(_summed(m.bias.grad), bn.bias.grad, 1e-5, "grad_bias")
    close(m.running_var, bn.running_var, 1e-5, "running_var")
    close(m.running_mean, bn.running_mean, 1e-5, "running_mean")
    return "ok"


def _special_subgroup_of_two(rank, world):
    """sync_batchnorm(group): ranks 0 and 1 sync over their group while rank 2 trains unsynced."""
    import torch.distributed as dist
    pair, alone = dist.new_group([0, 1]), dist.new_group([2])  # every rank creates every group
    case = dict(kernel="cpp", dtype="float32", layout="nchw", op="bn_add_act", act="leaky_relu", split=(2, 3))
    d = _data(case, 7)
    if rank < 2:
        _, sl, got = _ours(case, d, rank, group=pair)
        _compare(case, got, _truth(case, d), sl, 2, pair)
    else:
        solo = dict(case, split=(0, 0, 2))
        _, sl, got = _ours(solo, _data(solo, 8), rank, sync=False)
        _compare(solo, got, _truth(solo, _data(solo, 8)), sl, 1, alone)
    dist.barrier()
    return "ok"


def _worker(rank, world, store, out_dir, cases):
    sys.path.insert(0, str(HERE))  # ops_parity
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for i, (cid, case) in enumerate(cases.items()):
            try:
                results[cid] = _run_case(case, rank, world, seed=i)
                _write_results(out_dir, rank, results)  # what a hang leaves behind
            except Exception as e:
                # Stop at the first failure: a case that fails on one rank leaves the ranks' collectives
                # out of step, so later cases would time out (60 s each) or pair unrelated collectives.
                # The other ranks stop at their next collective's timeout at the latest.
                results[cid] = f"FAIL: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
                for rest in list(cases)[i + 1:]:
                    results[rest] = f"FAIL: not run: rank {rank} stopped after {cid} failed"
                break
    finally:
        _write_results(out_dir, rank, results)
        dist.destroy_process_group()


GROUP_DEADLINE_S = 240  # a group takes 15-30 s on 2 busy cores


def _write_results(out_dir, rank, results):
    tmp = Path(out_dir, f"rank{rank}.json.tmp")
    tmp.write_text(json.dumps(results))
    tmp.replace(Path(out_dir, f"rank{rank}.json"))  # whole or absent, whenever the rank dies


def _read_results(tmp, rank):
    f = tmp / f"rank{rank}.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _spawn(group_name, tmp):
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException
    spec = GROUPS[group_name]
    with pytest.MonkeyPatch.context() as mpatch:
        if spec.get("interpret"):
            mpatch.setenv("TRITON_INTERPRET", "1")  # read by the spawned ranks only, at their kernel import
        mpatch.setenv("OMP_NUM_THREADS", "1")
        ranks = mp.start_processes(_worker, args=(spec["world"], str(tmp / "store"), str(tmp), spec["cases"]),
                                   nprocs=spec["world"], join=False, start_method="spawn")
    # The collectives time out after 60 s, but ranks whose collectives fell out of step can pair
    # unrelated ones and keep waiting: bound the whole group too, so a hang fails instead of stalling.
    deadline = time.monotonic() + GROUP_DEADLINE_S

    def last_done():
        return {r: (list(_read_results(tmp, r)) or [None])[-1] for r in range(spec["world"])}

    try:
        while not ranks.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ranks.processes:
                    p.kill()
                pytest.fail(f"{group_name}: the ranks did not finish within {GROUP_DEADLINE_S} s; "
                            f"last case finished per rank: {last_done()}")
    except ProcessException as e:  # e.g. gloo aborts a rank on a collective size mismatch
        raise RuntimeError(f"{e}; last case finished per rank: {last_done()}") from None
    merged = {}
    for rank in range(spec["world"]):
        for cid, res in _read_results(tmp, rank).items():
            before = merged.get(cid, "ok")
            if res != "ok" and (before == "ok" or "FAIL: not run" in before):  # the first real failure wins
                merged[cid] = f"rank {rank}: {res}"
            merged.setdefault(cid, res)
    return merged


_results: dict[str, dict | str] = {}  # group -> {case: result}, or why the group did not run


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """The spawned group's results, spawned once per group: a group that crashed or hung is
    remembered too, so its other cases fail at once instead of spawning it again."""
    def get(name, case):
        if name not in _results:
            try:
                _results[name] = _spawn(name, tmp_path_factory.mktemp(f"syncbn-{name}"))
            except (Exception, pytest.fail.Exception) as e:
                _results[name] = f"{name}: the spawned ranks failed: {type(e).__name__}: {e}"
        res = _results[name]
        if isinstance(res, str):
            pytest.fail(res)
        return res.get(case, "missing from the ranks' output")
    return get


def _check(result):
    if result.startswith("skip"):
        pytest.skip(result)
    assert result == "ok", result


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GROUPS["world2"]["cases"]))
def test_two_ranks(group_results, case):
    _check(group_results("world2", case))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(GROUPS["world3"]["cases"]))
def test_three_ranks(group_results, case):
    _check(group_results("world3", case))


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install -r requirements.txt)")
@pytest.mark.parametrize("case", sorted(GROUPS["triton"]["cases"]))
def test_triton_interpreter(group_results, case):
    _check(group_results("triton", case))


def test_without_torch_distributed_is_unsynced():
    """Inside the context but with no process group: exactly today's module (nn.BatchNorm2d's
    numbers), no error."""
    import torch.distributed as dist
    from aegan_fast import ops
    assert not dist.is_initialized()
    m, plain = ops.BatchNormAddAct2d(C, "relu"), torch.nn.BatchNorm2d(C)
    x, r = torch.randn(2, C, H, W) * 2, torch.randn(2, C, H, W)
    with ops.sync_batchnorm():
        out = m(x, r)
    torch.testing.assert_close(out.detach(), torch.relu(plain(x) + r).detach())
    torch.testing.assert_close(m.running_var, plain.running_var)


def test_bad_group_is_a_clear_error():
    from aegan_fast import ops
    with pytest.raises(TypeError, match="ProcessGroup"):
        with ops.sync_batchnorm(group="world"):
            pass
