"""Fast sampling: BatchNorm folding, ONNX export + ONNX Runtime, the Sampler backends, the TensorRT
sidecar and argument checks. TensorRT itself and the GPU paths skip with a reason where absent."""
from __future__ import annotations

import copy
import json
import runpy
import sys

import pytest
import torch
from torch import nn

import aegan_fast.sampling as sampling_mod
from aegan_fast import ops
from aegan_fast.training.run_state import load_sampling_nets
from aegan_fast.config import TrainConfig
from aegan_fast.data import to_uint8
from aegan_fast.errors import UserError
from aegan_fast.export import fold_chain
from aegan_fast.export.cli import main as export_main
from aegan_fast.export.fold import fold_conv_bn, uses_custom_ops
from aegan_fast.export.onnx_export import (TOLERANCE, export_checkpoint, export_onnx, exporter, onnx_io,
                                           onnx_metadata, ort_session)
from aegan_fast.export.trt import (check_profile, make_sidecar, read_sidecar, sidecar_path, tensorrt_unavailable,
                                   write_sidecar)
from aegan_fast.files import sha256_file
from aegan_fast.models import ModelConfig, build_nets, SamplingChain, per_seed_z, sample_z, seeded_z
from aegan_fast.ops import BatchNormAct2d
from aegan_fast.sample import main as sample_main
from aegan_fast.sampling import Sampler, SamplerOptions, parse_seeds, sampler_backends
from aegan_fast.testing import FP32_CHAIN, lively_weights, plain_twin, reference_chain

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
if exporter()[0] is None:
    pytest.skip(f"no ONNX exporter: {exporter()[1]}", allow_module_level=True)

TINY = dict(resolution=64, ae_channels=16, ge_base_channels=32, max_channels=32)


def save_lively_checkpoint(path, **model) -> tuple[TrainConfig, nn.Module]:
    cfg = TrainConfig(model=ModelConfig(**{**TINY, **model}), device="cpu")
    nets = lively_weights(build_nets(cfg.model)).eval()
    torch.save({"config": cfg.to_dict(), "nets": nets.state_dict()}, path)
    return cfg, nets


@pytest.fixture(scope="module")
def lively_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lively") / "lively.pt"
    save_lively_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def reference():
    """The lively checkpoint's chain rebuilt from scratch (not loaded from it) in stock torch
    (F.batch_norm, no aegan_fast.ops, no fold) and float64: what every sampler backend is judged against."""
    return reference_chain(lively_weights(build_nets(ModelConfig(**TINY))).eval())


def uint8_agree(got: torch.Tensor, want: torch.Tensor) -> bool:
    """The same PNG pixels, give or take one grey level where a value sits on a rounding edge."""
    return (to_uint8(got).int() - to_uint8(want).int()).abs().max().item() <= 1


def cpp_if_available():
    """The cpp op backend when it loads (the exported graph must hold no custom op whichever backend
    is selected), else the default."""
    return ops.use_backend("cpp" if ops.availability().get("cpp") is None else "auto")


@pytest.fixture(scope="module")
def lively_onnx(lively_ckpt, tmp_path_factory):
    """fp32, dynamic batch, exported with the cpp op backend active when it loads."""
    out = tmp_path_factory.mktemp("onnx") / "sampler.onnx"
    with cpp_if_available():
        export_main(["--ckpt", str(lively_ckpt), "--out", str(out), "--dynamic-batch"])
    return out


# ---- folding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["conv", "conv_transpose"])
def test_fold_conv_bn_layout(kind):
    """Conv2d weights are (out, in, kh, kw), ConvTranspose2d (in, out/groups, kh, kw): the BN scale
    must land on the output channel in both, with and without a bias, grouped too where torch's
    fuse_conv_bn_eval can, and a grouped ConvTranspose2d is refused rather than folded wrong."""
    torch.manual_seed(1)
    for groups, bias in ((1, False), (2, True)):
        conv = (nn.Conv2d(4, 6, 3, 1, 1, groups=groups, bias=bias) if kind == "conv"
                else nn.ConvTranspose2d(4, 6, 4, 2, 1, groups=groups, bias=bias))
        x = torch.randn(2, 4, 5, 5)
        for bn in (lively_weights(nn.Sequential(nn.BatchNorm2d(6)), seed=groups)[0].eval(),
                   lively_weights(nn.Sequential(BatchNormAct2d(6, "leaky_relu", 0.1)), seed=groups)[0].eval()):
            if kind == "conv_transpose" and groups > 1:
                with pytest.raises(ValueError, match="grouped ConvTranspose2d"):
                    fold_conv_bn(conv, bn)
                continue
            before = copy.deepcopy(conv.state_dict())
            folded = fold_conv_bn(conv, bn)
            assert not uses_custom_ops(folded) and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
            with torch.no_grad():
                torch.testing.assert_close(folded(x), plain_twin(nn.Sequential(conv, bn))(x), rtol=0, atol=1e-5)
            assert conv.training and bn.training is False  # the originals are untouched
            assert all(torch.equal(v, before[k]) for k, v in conv.state_dict().items())
            assert (conv.bias is None) == (not bias)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_folded_graph_equals_unfolded(backend):
    if ops.availability().get(backend) is not None:
        pytest.skip(f"op backend {backend!r} unavailable: {ops.availability()[backend]}")
    cfg = ModelConfig(**TINY)
    nets = lively_weights(build_nets(cfg))  # train mode: folding must not change that either
    state = copy.deepcopy(nets.state_dict())
    graph = fold_chain(SamplingChain.of(nets))
    assert isinstance(graph, SamplingChain) and not graph.training
    assert all(m.training for m in nets.modules())
    nets.eval()
    assert uses_custom_ops(nets) and not uses_custom_ops(graph)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in graph.modules())
    z = sample_z(5, cfg.z_dim, torch.Generator().manual_seed(0))
    truth = reference_chain(nets)
    with torch.no_grad(), ops.use_backend(backend):
        want = truth(z)
        assert want.std() > 0.15 and want.std(0).mean() > 0.1  # a meaningful comparison: images span the range, vary with z
        got = graph(z)
        assert (SamplingChain.of(nets)(z) - want).abs().max() <= FP32_CHAIN  # the fused ops, unfolded
        torch.testing.assert_close(got, want, rtol=0, atol=FP32_CHAIN)
        # In float64 the fold is exact up to rounding: any misplaced scale or shift shows far above 1e-10.
        twin64 = SamplingChain.of(plain_twin(nets).double())
        graph64 = fold_chain(SamplingChain.of(copy.deepcopy(nets).double()))
        torch.testing.assert_close(graph64(z.double()), twin64(z.double()), rtol=0, atol=1e-10)
        no_phi = fold_chain(SamplingChain.of(nets, denoise=False))
        assert no_phi.phi is None
        want_no_phi = reference_chain(nets, denoise=False)(z)
        torch.testing.assert_close(no_phi(z), want_no_phi, rtol=0, atol=FP32_CHAIN)
        assert (want_no_phi - want).abs().max() > 0.1  # φ really ran in the full chain
        assert torch.equal(graph(z), got)  # deterministic: no dropout, no RNG
    for k, v in nets.state_dict().items():  # folding copies, never modifies the nets
        assert torch.equal(v, state[k]), k


# ---- ONNX --------------------------------------------------------------------------------------

def test_onnx_export_checks_and_matches_torch(lively_onnx, lively_ckpt):
    model = onnx.load(str(lively_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops_used = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops_used and not any(o.domain.startswith("aegan") for o in model.opset_import)
    io = onnx_io(lively_onnx)
    assert io["inputs"][0]["name"] == "z" and io["inputs"][0]["shape"][1:] == [100]
    assert isinstance(io["inputs"][0]["shape"][0], str)  # a symbolic batch
    assert io["outputs"][0]["shape"][1:] == [3, 64, 64] and io["outputs"][0]["dtype"] == "float32"
    meta = onnx_metadata(lively_onnx)
    assert meta["checkpoint_sha256"] == sha256_file(lively_ckpt) and meta["resolution"] == "64"

    _, nets = load_sampling_nets(lively_ckpt)
    sampler = Sampler.load(lively_onnx)
    assert sampler.backend == "onnxruntime" and sampler.max_batch is None
    for n in (1, 7):
        z = sample_z(n, 100, torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = SamplingChain.of(nets)(z)
        got = sampler(z)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= 1e-4


def test_trained_run_exports_and_samples_like_torch(tiny_run, tmp_path, capsys):
    trained_run = tiny_run[0]  # conftest.tiny_run: three stages of a tiny model
    """The issue's end-to-end check: a trained tiny model, exported, run in ONNX Runtime, same images."""
    out = tmp_path / "sampler.onnx"
    export_main(["--ckpt", str(trained_run), "--out", str(out)])
    assert "onnxruntime vs torch: max abs diff" in capsys.readouterr().out
    _, nets = load_sampling_nets(trained_run)
    want = reference_chain(nets).sample(6, seed=3)
    got = Sampler.load(out).sample(6, seed=3, batch=4)
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * max(1.0, want.abs().max().item()) and err <= 1e-2 * want.std().item()
    assert uint8_agree(got, want)  # near-constant images after a few steps: the lively test below has the power

    # The sample CLI takes the ONNX file (onnxruntime backend by default) and a --backend flag.
    sample_main(["--ckpt", str(out), "--n", "3", "--out", str(tmp_path / "onnx.png")])
    sample_main(["--ckpt", str(trained_run), "--backend", "torch", "--n", "3", "--out", str(tmp_path / "eager.png")])
    assert (tmp_path / "onnx.png").stat().st_size > 0 and (tmp_path / "eager.png").stat().st_size > 0
    with pytest.raises(SystemExit) as e:
        sample_main(["--ckpt", str(out), "--no-denoise", "--n", "1", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2


def test_exported_pixels_match_and_a_broken_export_is_caught(lively_onnx, reference, tmp_path):
    """Seeded samples from the ONNX file give the PNG pixels of the stock-torch reference, on images
    that vary; and the same check refuses an export with one folded weight nudged."""
    want = reference.sample(6, seed=3)
    pixels = to_uint8(want).float()
    assert pixels.std() > 40 and (pixels[0] - pixels[1]).abs().mean() > 20  # images with content, all different
    assert uint8_agree(Sampler.load(lively_onnx).sample(6, seed=3, batch=4), want)

    broken = fold_chain(SamplingChain.of(lively_weights(build_nets(ModelConfig(**TINY))).eval()))
    with torch.no_grad():
        [m for m in broken.phi.modules() if isinstance(m, nn.ConvTranspose2d)][-1].weight[0, 0, 1, 1] += 0.05
    path = export_onnx(broken, tmp_path / "broken.onnx")
    assert not uint8_agree(Sampler.load(path).sample(6, seed=3, batch=4), want)


def test_export_that_fails_validation_exits_1_and_leaves_nothing(lively_ckpt, tmp_path, monkeypatch, capsys):
    import aegan_fast.export.onnx_export as ox
    monkeypatch.setitem(ox.TOLERANCE, "fp32", -1.0)
    out = tmp_path / "sampler.onnx"
    with pytest.raises(SystemExit) as e:
        export_main(["--ckpt", str(lively_ckpt), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ONNX Runtime disagrees with torch") and err.count("\n") == 1
    assert not out.exists()


def test_fp16_fixed_batch_export_is_bounded_and_chunked(lively_ckpt, tmp_path):
    out = tmp_path / "sampler16.onnx"
    export_main(["--ckpt", str(lively_ckpt), "--out", str(out), "--dtype", "fp16", "--batch", "4"])
    io = onnx_io(out)
    assert io["inputs"][0]["shape"] == [4, 100] and io["inputs"][0]["dtype"] == "float16"
    assert io["outputs"][0]["dtype"] == "float16"
    _, nets = load_sampling_nets(lively_ckpt)
    sampler = Sampler.load(out, precision="fp16")
    assert sampler.max_batch == sampler.min_batch == 4 and sampler.precision == "fp16"
    z = sample_z(6, 100, torch.Generator().manual_seed(0))  # one full chunk of 4, one padded chunk of 2
    with torch.no_grad():
        want = SamplingChain.of(nets)(z)
    got = sampler(z)
    assert got.shape == (6, 3, 64, 64) and got.dtype == torch.float32
    err = (got - want).abs().max().item()
    assert 0 < err <= TOLERANCE["fp16"], err  # fp16 really ran, within the stated bound
    torch.testing.assert_close(sampler(z[4:]), got[4:], rtol=0, atol=0)  # padding does not leak


def test_legacy_torchscript_exporter_fallback(lively_ckpt, tmp_path, monkeypatch):
    """Without onnxscript the deprecated TorchScript exporter (dynamo=False) is used when torch has it."""
    import importlib.util
    if importlib.util.find_spec("torch.onnx._internal.torchscript_exporter") is None:
        pytest.skip("this torch has no TorchScript ONNX exporter")
    import aegan_fast.export.onnx_export as ox
    monkeypatch.setattr(ox, "exporter", lambda: ("torchscript", "forced by the test"))
    rep = export_checkpoint(lively_ckpt, tmp_path / "legacy.onnx")
    assert rep["max_abs_diff"] <= 1e-4 and onnx_metadata(rep["path"])["exporter"] == "torchscript"


# ---- Sampler -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sampler_torch_and_compile_backends(lively_ckpt, reference, monkeypatch):
    """Every torch-side backend against the stock-torch reference rebuilt from scratch (not the
    checkpoint's nets, not aegan_fast.ops, not the fold)."""
    z = sample_z(3, 100, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(z)
    assert want.std() > 0.15
    eager = Sampler.load(lively_ckpt, backend="torch", device="cpu")
    assert isinstance(eager.chain, SamplingChain) and not uses_custom_ops(eager.chain) and eager.precision == "fp32"
    torch.testing.assert_close(eager(z), want, rtol=0, atol=FP32_CHAIN)
    bf16 = Sampler.load(lively_ckpt, backend="torch", device="cpu", precision="bf16")  # training's word for it
    assert bf16.precision == "bf16" and {p.dtype for p in bf16.chain.parameters()} == {torch.bfloat16}
    err = (bf16(z) - want).abs()
    assert 0 < err.mean() < 0.02 and err.max() < 0.3, (err.mean(), err.max())  # bf16 really ran, close to fp32
    unfolded = Sampler.load(lively_ckpt, backend="torch", device="cpu", options=SamplerOptions(fold=False))
    assert uses_custom_ops(unfolded.chain)  # really the nets as trained, through aegan_fast.ops
    torch.testing.assert_close(unfolded(z), want, rtol=0, atol=FP32_CHAIN)
    chunked = Sampler.load(lively_ckpt, backend="torch", device="cpu")
    chunked.max_batch = 2
    torch.testing.assert_close(chunked(z), eager(z), rtol=0, atol=FP32_CHAIN)  # convs round by batch size
    # Seeded sampling draws the z every sampler draws: U(-1, 1) from a CPU generator seeded with seed.
    drawn = torch.rand(5, 100, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(eager.sample(5, seed=7, batch=2), reference(drawn), rtol=0, atol=FP32_CHAIN)
    assert torch.equal(seeded_z(5, 100, 7), drawn)

    if sampler_backends("cpu")["compile"] is not None:
        pytest.skip(f"compile backend unavailable: {sampler_backends('cpu')['compile']}")
    compiled = Sampler.load(lively_ckpt, backend="compile", device="cpu")
    got = compiled(z)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert compiled._run.checked[(3, 100)] <= 1e-3
    # A compiled graph that disagrees with eager is refused, never returned.
    compiled._run.checked.clear()
    monkeypatch.setitem(sampling_mod.COMPILE_TOLERANCE, torch.float32, -1.0)
    with pytest.raises(RuntimeError, match="differs from eager"):
        compiled(z)


def test_sampler_load_errors(lively_ckpt, lively_onnx, tmp_path):
    with pytest.raises(UserError, match="unknown sampler backend"):
        Sampler.load(lively_ckpt, backend="jax")
    with pytest.raises(UserError, match="not a .onnx"):
        Sampler.load(lively_onnx, backend="torch")
    with pytest.raises(UserError, match="no file"):
        Sampler.load(tmp_path / "missing.onnx")
    if tensorrt_unavailable():
        with pytest.raises(UserError, match="'tensorrt' is not available"):
            Sampler.load(lively_ckpt, backend="tensorrt", device="cpu")
    with pytest.raises(ValueError, match="z must be"):
        Sampler.load(lively_onnx)(torch.zeros(2, 7))
    # One precision vocabulary, training's; what a backend or a file cannot run is refused by name.
    with pytest.raises(UserError, match="unknown sampler precision 'half'"):
        Sampler.load(lively_ckpt, backend="torch", device="cpu", precision="half")
    with pytest.raises(UserError, match="runs in fp32 .fixed at export.; precision 'fp16'"):
        Sampler.load(lively_onnx, precision="fp16")
    assert Sampler.load(lively_onnx, precision="fp32").precision == "fp32"
    with pytest.raises(UserError, match="'onnxruntime' runs an export in fp32 or fp16, not bf16"):
        Sampler.load(lively_ckpt, backend="onnxruntime", device="cpu", precision="bf16")
    # An option of another backend is an error, not silently ignored.
    with pytest.raises(UserError, match="'torch' has no option compile_mode, cuda_graph .compile_mode: compile; "
                                        "cuda_graph: tensorrt."):
        Sampler.load(lively_ckpt, backend="torch", device="cpu",
                     options=SamplerOptions(compile_mode="max-autotune", cuda_graph=True))


def test_doctor_reports_each_sampler_backend_as_the_sampler_has_it(monkeypatch):
    """The doctor's sampler rows are sampler_backends() row for row (a backend that cannot run is
    reported with the sampler's reason), and its auto row is auto_backend's choice."""
    from aegan_fast import doctor

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def rows():
        return {name: reason for name, reason, _ in doctor.sampler_rows(torch)}

    def expected(backends):
        return {**{f"{b} ({device})": why for b, why in backends.items()}, f"auto ({device})": None}

    assert rows() == expected(sampler_backends(device))
    faked = {b: f"{b} made unavailable by this test" for b in sampling_mod.BACKENDS if b != "auto"}
    faked["onnxruntime"] = faked["torch"] = None
    monkeypatch.setattr(sampling_mod, "sampler_backends", lambda device="cpu": dict(faked))
    assert rows() == expected(faked)
    auto_detail = doctor.sampler_rows(torch)[-1][2]
    assert auto_detail.startswith("torch: " if device == "cuda" else "onnxruntime: ")
    assert "compile: compile made unavailable by this test" in auto_detail


# ---- export CLI argument checks and the TensorRT sidecar ----------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--out", "x.plan"], "ends in .onnx"),
    (["--out", "x.onnx", "--batch", "0"], "--batch must be"),
    (["--out", "x.onnx", "--opset", "13"], "opset 17"),
    (["--out", "x.onnx", "--max-batch", "8"], "only apply to --format tensorrt"),
    (["--format", "tensorrt", "--out", "x.onnx"], "TensorRT engine ends in"),
    (["--format", "tensorrt", "--out", "x.plan", "--min-batch", "8", "--max-batch", "4"], "1 ≤ min ≤ opt ≤ max"),
    (["--format", "tensorrt", "--out", "x.plan", "--batch", "4", "--max-batch", "8"], "--batch fixes"),
    (["--format", "tensorrt", "--out", "x.plan", "--workspace-gb", "0"], "--workspace-gb"),
    (["--format", "tensorrt", "--out", "x.plan", "--onnx", "x.plan"], "ends in .onnx"),
])
def test_export_cli_argument_errors(args, message, lively_ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        export_main(["--ckpt", str(lively_ckpt), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_export_cli_missing_inputs(tmp_path, lively_ckpt, capsys):
    with pytest.raises(SystemExit) as e:
        export_main(["--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x.onnx")])
    assert e.value.code == 2 and "no run directory or checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: --batch and --dynamic-batch exclude each other
        export_main(["--ckpt", str(lively_ckpt), "--out", "x.onnx", "--batch", "2", "--dynamic-batch"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    reason = tensorrt_unavailable()
    if reason is None:
        pytest.skip("TensorRT is usable here: the missing-TensorRT error cannot be shown")
    with pytest.raises(SystemExit) as e:
        export_main(["--ckpt", str(lively_ckpt), "--format", "tensorrt", "--out", str(tmp_path / "x.plan")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --format tensorrt:") and err.count("\n") == 1
    assert not (tmp_path / "x.plan").exists() and not (tmp_path / "x.onnx").exists()


def test_python_m_aegan_fast_export_runs_the_cli(tmp_path, monkeypatch, capsys):
    """The package's __main__ is the export CLI, errors and exit codes included (in process: runpy)."""
    monkeypatch.setattr(sys, "argv", ["aegan_fast.export", "--ckpt", str(tmp_path / "nope"), "--out", "x.onnx"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("aegan_fast.export", run_name="__main__")
    assert e.value.code == 2 and "no run directory or checkpoint" in capsys.readouterr().err


def test_tensorrt_sidecar_from_the_onnx_it_consumes(lively_ckpt, lively_onnx, tmp_path):
    plan = tmp_path / "sampler.plan"
    info = make_sidecar(engine=plan, io=onnx_io(lively_onnx), profile={"min": 1, "opt": 8, "max": 32},
                        tensorrt_version="10.x (not built)", checkpoint=lively_ckpt,
                        checkpoint_sha256=sha256_file(lively_ckpt), onnx_path=lively_onnx, z_dim=100, resolution=64,
                        denoise=True, dtype="fp32", workspace_bytes=2**30)
    path = write_sidecar(plan, info)
    assert path == sidecar_path(plan) == tmp_path / "sampler.json"
    back = read_sidecar(plan)
    assert back == json.loads(path.read_text()) == info
    assert back["inputs"][0]["name"] == "z" and back["outputs"][0]["name"] == "image"
    assert back["profile"] == {"min": 1, "opt": 8, "max": 32}
    assert back["checkpoint_sha256"] == sha256_file(lively_ckpt) and len(back["onnx_sha256"]) == 64
    with pytest.raises(ValueError):
        check_profile(4, 2, 8)
    with pytest.raises(ValueError, match="name, shape and dtype"):
        make_sidecar(**{**dict(engine=plan, io={"inputs": [{"name": "z"}], "outputs": []},
                               profile={"min": 1, "opt": 1, "max": 1}, tensorrt_version="", checkpoint="c",
                               checkpoint_sha256="", onnx_path=lively_onnx, z_dim=1, resolution=64, denoise=True,
                               dtype="fp16", workspace_bytes=1)})
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not an aegan_fast engine sidecar"):
        read_sidecar(plan)


@pytest.mark.skipif(tensorrt_unavailable() is not None, reason=f"TensorRT engine build: {tensorrt_unavailable()}")
def test_tensorrt_engine_build_and_run(lively_ckpt, tmp_path):
    plan = tmp_path / "sampler.plan"
    export_main(["--ckpt", str(lively_ckpt), "--format", "tensorrt", "--out", str(plan),
                 "--min-batch", "1", "--opt-batch", "2", "--max-batch", "4", "--workspace-gb", "1"])
    info = read_sidecar(plan)
    assert info["inputs"][0]["dtype"] == "float16" and info["profile"]["max"] == 4
    assert (tmp_path / "sampler.timing-cache").stat().st_size > 0
    _, nets = load_sampling_nets(lively_ckpt)
    z = sample_z(6, 100, torch.Generator().manual_seed(0))  # chunked: 4 + 2
    with torch.no_grad():
        want = SamplingChain.of(nets)(z)
    for cuda_graph in (False, True):
        sampler = Sampler.load(plan, device="cuda", options=SamplerOptions(cuda_graph=cuda_graph))
        got = sampler(z.cuda())
        assert got.is_cuda and (got.cpu() - want).abs().max().item() <= TOLERANCE["fp16"]


@pytest.mark.skipif(sampler_backends("cuda" if torch.cuda.is_available() else "cpu").get("onnxruntime") is not None
                    or not torch.cuda.is_available(),
                    reason="needs a CUDA GPU and onnxruntime's CUDAExecutionProvider")
def test_onnxruntime_cuda_provider(lively_onnx, lively_ckpt):
    sampler = Sampler.load(lively_onnx, device="cuda")
    assert "CUDAExecutionProvider" in ort_session(lively_onnx, ["CUDAExecutionProvider"]).get_providers()
    _, nets = load_sampling_nets(lively_ckpt)
    z = sample_z(3, 100, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = SamplingChain.of(nets)(z)
    assert (sampler(z.cuda()).cpu() - want).abs().max().item() <= 1e-3


# ---- seeds -------------------------------------------------------------------------------------

def test_parse_seeds_reads_lists_and_ranges_and_names_what_is_wrong():
    assert parse_seeds("3,7,100-103") == [3, 7, 100, 101, 102, 103]
    assert parse_seeds(" 5 ") == [5] and parse_seeds("2-2,1,1") == [2, 1, 1]
    for bad, why in (("", "not a seed"), ("1,,2", "'' is not a seed"), ("a-3", "not a seed"), ("-3", "not a seed"),
                     ("1-2-3", "not a seed"), ("5-2", "runs backwards"), (str(2 ** 63), "past the largest"),
                     ("0-2000000", "more than a million")):
        with pytest.raises(UserError, match=why):
            parse_seeds(bad)


def test_a_seed_is_one_image_alone_in_a_list_at_any_batch_and_on_two_backends(lively_ckpt, lively_onnx, reference):
    """Seed 5 alone, seed 5 inside 0-9 and inside the reversed list, at batch sizes 1, 3 and 4, on the
    torch and onnxruntime backends: the same image, each checked against the stock-torch reference
    of the seed's own z (the first row of seeded_z for that seed)."""
    z = torch.cat([seeded_z(1, 100, s) for s in range(10)])
    assert torch.equal(per_seed_z(range(10), 100), z) and not torch.equal(z, seeded_z(10, 100, 0))
    with torch.no_grad():
        want = reference(z)
    eager = Sampler.load(lively_ckpt, backend="torch", device="cpu")
    torch.testing.assert_close(eager.sample(seeds=[5], batch=1)[0], want[5], rtol=0, atol=FP32_CHAIN)
    torch.testing.assert_close(eager.sample(seeds=range(10), batch=3), want, rtol=0, atol=FP32_CHAIN)
    torch.testing.assert_close(eager.sample(seeds=range(9, -1, -1), batch=4), want.flip(0), rtol=0, atol=FP32_CHAIN)
    ort = Sampler.load(lively_onnx, backend="onnxruntime")
    assert uint8_agree(ort.sample(seeds=[5])[0:1], want[5:6])
    assert uint8_agree(ort.sample(seeds=range(10), batch=4), want)
    for bad in ([], ()):
        with pytest.raises(UserError, match="empty"):
            eager.sample(seeds=bad)
    with pytest.raises(UserError, match="not both"):
        eager.sample(4, seeds=[1])


@pytest.mark.slow  # two torch.compile runs (batch 1 and 4)
def test_a_seed_is_one_image_on_the_compile_backend(lively_ckpt, reference):
    if sampler_backends("cpu")["compile"] is not None:
        pytest.skip(f"compile backend unavailable: {sampler_backends('cpu')['compile']}")
    with torch.no_grad():
        want = reference(per_seed_z(range(8), 100))
    compiled = Sampler.load(lively_ckpt, backend="compile", device="cpu")
    torch.testing.assert_close(compiled.sample(seeds=[5], batch=1)[0], want[5], rtol=0, atol=1e-4)
    torch.testing.assert_close(compiled.sample(seeds=range(7, -1, -1), batch=4), want.flip(0), rtol=0, atol=1e-4)


def read_png(path) -> torch.Tensor:
    import numpy as np
    from PIL import Image
    return torch.from_numpy(np.array(Image.open(path)))


def test_sample_cli_seeds_folder_names_labels_and_errors(lively_ckpt, tmp_path, capsys):
    folder = tmp_path / "seeds"
    sample_main(["--ckpt", str(lively_ckpt), "--backend", "torch", "--seeds", "7,3-4", "--out", f"{folder}/"])
    assert sorted(p.name for p in folder.iterdir()) == ["seed000003.png", "seed000004.png", "seed000007.png"]
    eager = Sampler.load(lively_ckpt, backend="torch", device="cpu")
    png = read_png(folder / "seed000004.png").permute(2, 0, 1)
    assert (png.int() - to_uint8(eager.sample(seeds=[4]))[0].int()).abs().max() <= 1  # batch 3 vs 1: rounding
    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    sample_main(["--ckpt", str(lively_ckpt), "--backend", "torch", "--seeds", "0-3", "--out", str(plain)])
    sample_main(["--ckpt", str(lively_ckpt), "--backend", "torch", "--seeds", "0-3", "--labels", "--out", str(labelled)])
    a, b = read_png(plain), read_png(labelled)
    assert a.shape == b.shape and (a != b).any()  # the labels are drawn into the cells
    assert (a != b).any(-1).nonzero()[:, 0].max() < a.shape[0] // 2 + 16  # ... at the top of each row of cells
    capsys.readouterr()
    for args, message in ((["--seeds", "1-x"], "not a seed"), (["--seeds", "3", "--n", "4"], "drop --n and --seed"),
                          (["--n", "0"], "--n must be ≥ 1")):
        with pytest.raises(SystemExit) as e:
            sample_main(["--ckpt", str(lively_ckpt), "--out", str(tmp_path / "g.png"), *args])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_file_that_is_not_an_onnx_model_is_one_clear_line(tmp_path, capsys):
    """A truncated or foreign .onnx gives exit 2 and one line naming it, not a protobuf traceback."""
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match="garbage.onnx is not a readable ONNX model"):
        Sampler.load(bad, backend="onnxruntime")
    with pytest.raises(SystemExit) as e:
        sample_main(["--ckpt", str(bad), "--n", "2", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a readable ONNX model" in err and "Traceback" not in err
