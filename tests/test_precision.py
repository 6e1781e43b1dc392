"""bf16 + channels_last training (precision.py): what stays fp32, that activations really are bf16
channels_last through a step with no layout round trip, and that bf16 trains as well as fp32."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from aegan_fast import compiling, precision
from aegan_fast.data import load_dataset
from aegan_fast.errors import UserError
from aegan_fast.models import ReflectConv2d, build_nets
from aegan_fast.training import train
from aegan_fast.training import enter_stage, take_step
from aegan_fast.training.stages import AEGAN_STAGES, STAGES, run_stage
from aegan_fast.training.run_state import new_state, step_precision
from conftest import make_image_folder, tiny_config

CPU = torch.device("cpu")
needs_bf16 = pytest.mark.skipif(precision.native_bf16(CPU) is not None,
                                reason=f"no native bf16 on this CPU: {precision.native_bf16(CPU)}")


def test_auto_takes_bf16_channels_last_only_with_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: None)
    p = precision.resolve("auto", None, CPU)
    assert (p.name, p.channels_last) == ("bf16", True) and "native bf16" in p.why
    monkeypatch.setattr(precision, "native_bf16", lambda device: "no avx512_bf16")
    p = precision.resolve("auto", None, CPU)
    assert (p.name, p.channels_last) == ("fp32", False) and "no avx512_bf16" in p.why
    # An explicit layout wins over the precision's default.
    assert precision.resolve("fp32", True, CPU).channels_last
    assert not precision.resolve("bf16", False, CPU).channels_last


def test_native_bf16_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert "no native bf16" in precision.native_bf16(CPU)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert precision.native_bf16(CPU) is None


def test_fp16_on_the_cpu_and_unknown_names_are_clear_errors():
    with pytest.raises(UserError, match="CUDA only"):
        step_precision(tiny_config(precision="fp16"), CPU)
    with pytest.raises(ValueError, match="--precision must be one of"):
        precision.resolve("fp8", None, CPU)


class Inputs(TorchDispatchMode):
    """Records (op, dtypes of its tensor arguments, whether each is channels_last)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.calls.append((str(func.overloadpacket), [t.dtype for t in tensors],
                           [t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors]))
        return func(*args, **(kwargs or {}))


def test_reflect_pad_keeps_bf16_under_autocast():
    conv = ReflectConv2d(8, 8, 3, 1, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 9, 7).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with Inputs() as seen, torch.autocast("cpu", torch.bfloat16):
        y = conv(x)
    pads = [dtypes for op, dtypes, _ in seen.calls if op.startswith("aten.reflection_pad2d")]
    assert pads == [[torch.bfloat16]]  # CPU autocast's own policy would have run it on an fp32 copy
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(F.pad(x.float(), (1, 1, 1, 1), mode="reflect"), conv.weight.bfloat16().float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    # Outside autocast it is exactly nn.Conv2d(padding_mode="reflect").
    plain = nn.Conv2d(8, 8, 3, 1, 1, padding_mode="reflect", bias=False)
    plain.weight.data.copy_(conv.weight)
    x32 = torch.randn(2, 8, 9, 7)
    torch.testing.assert_close(conv(x32), plain(x32), rtol=0, atol=0)


def _state(tmp_path, prec: str, **overrides):
    cfg = tiny_config(precision=prec, seed=0, **overrides)
    data = load_dataset(str(make_image_folder(tmp_path / "img", n=16, size=64)), 64)
    return new_state(cfg, data, CPU, guard=False)


def _batches(st, n):
    g = torch.Generator().manual_seed(1)
    while True:
        idx, mirror = st.data.sample_indices(n, g)
        yield st.data.gather(idx, mirror, CPU), idx, mirror


@needs_bf16
def test_bf16_steps_keep_weights_moments_statistics_losses_and_ema_in_fp32(tmp_path):
    st = _state(tmp_path, "bf16")
    batches = _batches(st, st.cfg.batch)
    running = {k: [b.clone() for b in n.buffers()] for k, n in st.nets.items()}
    conv_inputs = []
    def record(module, args):
        if torch.is_autocast_enabled("cpu"):
            conv_inputs.append(args[0])
    hooks = [m.register_forward_pre_hook(record)
             for m in st.nets.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    losses = []
    for stage in AEGAN_STAGES:
        st.counters["stage_img"] = 0
        run_stage(stage, st, batches, 2 * st.cfg.batch, lambda l, *_: losses.append(l))
    for h in hooks:
        h.remove()
    # Every activation reaching a convolution inside the steps is bf16; z (N×z_dim×1×1) is the one
    # fp32 input, cast by autocast: 100 values per image. (The real-embedding table is encoded once,
    # in fp32, outside the steps: the hook skips it.)
    assert conv_inputs and all(x.dtype == torch.bfloat16 for x in conv_inputs if x.shape[-1] > 1)
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x in conv_inputs if x.shape[1] > 1)
    for name, net in st.nets.items():
        for p in net.parameters():
            assert p.dtype == torch.float32, name
        for b, before in zip(net.buffers(), running[name]):
            assert b.dtype == before.dtype  # running stats fp32, counts int64
    assert any(not torch.equal(b, before) for k in running for b, before in zip(st.nets[k].buffers(), running[k]))
    for opt in st.opts.values():
        for state in opt.state.values():
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for row in losses for v in row.values())
    assert st.ema is not None and all(p.dtype == torch.float32 for p in st.ema.nets.parameters())


def test_an_update_inside_a_bf16_step_reaches_the_steps_next_forward():
    """Autocast caches a weight's bf16 copy for its whole region and never looks at the weight
    again: without backward_and_step dropping that cache, a forward after an update inside one step
    runs on the weights from before it."""
    conv = nn.Conv2d(3, 4, 3)
    opt = torch.optim.Adam(conv.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    with precision.steps_in(precision.resolve("bf16", False, CPU)):
        before = conv(x)
        precision.backward_and_step(before.float().square().mean(), [opt])
        after = conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = conv(x)  # a new region: cast from the updated weights
    assert torch.equal(after, fresh) and not torch.equal(after, before)


def test_every_forward_of_a_bf16_stage_2_step_runs_on_the_weights_as_they_are_then(tmp_path):
    """Stage 2 updates D_E and G_E in several rounds a step: each round's convolutions must give
    what their current weights give, cast to bf16 now. (A generator's loss through a just-updated
    D is safe either way: _d_step turns D's gradients off after its update, and autocast caches
    only weights that require one.)"""
    st = _state(tmp_path, "bf16", embed_steps=2)
    emb = enter_stage(STAGES["embed"], st)
    checked, stale = [], []

    def check(module, args, out):
        if not torch.is_autocast_enabled("cpu"):
            return
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            w = module.weight.to(torch.bfloat16)
            b = None if module.bias is None else module.bias.to(torch.bfloat16)
            expected = module._conv_forward(args[0].to(torch.bfloat16), w, b)
        checked.append(module)
        if not torch.equal(out, expected):
            stale.append(module)
    hooks = [m.register_forward_hook(check) for name in ("D_E", "G_E", "D_R")
             for m in st.nets[name].modules() if type(m) in (nn.Conv2d, ReflectConv2d)]
    batch = st.batch(*next(_batches(st, st.cfg.batch)))
    take_step(STAGES["embed"], st, batch, emb)
    for h in hooks:
        h.remove()
    assert checked and not stale, f"{len(stale)} of {len(checked)} forwards ran on stale weights"


REORDER_PROBE = textwrap.dedent("""
    import torch
    from bench import bench_train_step as b
    from aegan_fast.models import ModelConfig
    b.SHAPES[64] = (ModelConfig(resolution=64, ae_channels=16, ge_base_channels=32, embed_max_channels=32,
                                max_channels=32), 5, 1)
    step = b.make_step({stage!r}, 64, {variant!r})
    step()
    print("=== measured step", flush=True)
    step()
""")


def _activation_reorders(stage: str, variant: str) -> tuple[int, int]:
    """(reorders of batch-sized tensors, all reorders) oneDNN ran in one training step, from its
    verbose log. The probe's batch is 5, which no weight dimension is: a reorder whose tensor starts
    with 5 moves an activation between layouts."""
    code = REORDER_PROBE.format(stage=stage, variant=variant)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, ONEDNN_VERBOSE="1"),
                         check=True).stdout
    lines = [ln for ln in out.split("=== measured step", 1)[1].splitlines() if ",exec,cpu,reorder," in ln]
    return sum(ln.split(",")[-2].startswith("5x") for ln in lines), len(lines)


@pytest.mark.slow
@needs_bf16
@pytest.mark.parametrize("stage", ["ae", "embed"])
def test_bf16_channels_last_step_moves_no_activation_between_layouts(stage):
    activations, _ = _activation_reorders(stage, "fast")
    assert activations == 0
    # The probe sees them where they happen: fp32 NCHW convolutions reorder their activations.
    activations, _ = _activation_reorders(stage, "reference")
    assert activations > 10


@pytest.mark.slow
@needs_bf16
def test_bf16_stage_1_reconstructs_as_well_as_fp32(tmp_path):
    """The issue's check: stage-1 L1 after 300 steps at R=64, same seed, bf16 within 3% of fp32's.
    Judged on the mean training L1 of the last 100 steps: one step's L1 moves by ±10% batch to batch,
    and the two runs' trajectories part after a few steps (rounding), so a single late value compares
    noise. Measured (2026-12-02, the demo's autoencoder rate 1e-3): fp32 0.0891 / 0.0909 on seeds 0 / 1,
    bf16 0.0862 / 0.0868. bf16 may come out better; it must not come out worse by more than 3%."""
    final = {}
    for prec in ("fp32", "bf16"):
        st = _state(tmp_path / prec, prec, batch=8)
        st.cfg.lr.update(H=1e-3, F=1e-3)  # run_stage sets the optimizers' rates from the config
        losses = []
        run_stage(AEGAN_STAGES[0], st, _batches(st, 8), 300 * 8, lambda l, *_: losses.append(float(l["ae_l1"])))
        assert len(losses) == 300
        final[prec] = sum(losses[-100:]) / 100
    assert final["fp32"] < 0.2  # it learned something, so the comparison means something
    assert final["bf16"] <= 1.03 * final["fp32"], final


@pytest.mark.parametrize("choice, compiles", [("auto", False), ("off", False), ("on", True)])
def test_the_trainer_compiles_its_nets_only_with_compile_on(tmp_path, monkeypatch, caplog, choice, compiles):
    """--compile auto stays off where a compiled step measured slower (compiling.py says where), and
    --compile on hands every net to compile_nets before the first step (recorded here, not compiled)."""
    calls = []
    monkeypatch.setattr(compiling, "compile_nets", lambda nets, inputs, prec: calls.append((sorted(nets), sorted(inputs))))
    data = load_dataset(str(make_image_folder(tmp_path / "img", n=8, size=64)), 64)
    cfg = tiny_config(compile=choice, stages=("ae",), kimg={"ae": 0.008}, eval_metrics=())
    with caplog.at_level("INFO", logger="aegan_fast"):
        train(cfg, tmp_path, progress=False, data=data, stop_after_steps=1)
    nets = sorted(build_nets(cfg.model))
    assert calls == ([(nets, nets)] if compiles else [])
    said = "compile: auto: off" if choice == "auto" else f"compile: --compile {choice}"
    assert any(r.getMessage().startswith(said) for r in caplog.records)


def test_compiled_net_is_checked_against_eager_and_keeps_its_state_dict_keys():
    cfg = tiny_config()
    nets = nn.ModuleDict({"F": build_nets(cfg.model)["F"]})
    keys = list(nets.state_dict())
    inputs = compiling.example_inputs(cfg, CPU)
    buffers = [b.clone() for b in nets.buffers()]
    compiling.compile_nets(nets, inputs, precision.FP32)
    assert list(nets.state_dict()) == keys  # checkpoints stay loadable with and without --compile
    assert all(torch.equal(a, b) for a, b in zip(nets.buffers(), buffers))  # the check left BN stats alone
    with torch.no_grad():
        torch.testing.assert_close(nets["F"](inputs["F"]), nets["F"]._call_impl(inputs["F"]), rtol=1e-4, atol=1e-4)


def test_a_compiled_net_that_differs_from_eager_is_refused(monkeypatch):
    cfg = tiny_config()
    nets = nn.ModuleDict({"D_E": build_nets(cfg.model)["D_E"]})
    outputs = iter([torch.zeros(4), torch.ones(4)])  # eager, then a "compiled" output off by 1
    monkeypatch.setattr(compiling, "_train_mode_output", lambda net, x: next(outputs))
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: None)
    with pytest.raises(UserError, match="torch.compile of D_E differs from eager by 1"):
        compiling.compile_nets(nets, compiling.example_inputs(cfg, CPU), precision.FP32)
