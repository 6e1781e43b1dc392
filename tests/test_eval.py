"""The eval CLI on a tiny trained run: JSON out, a readable table, clear errors."""
import json

import pytest

from aegan_fast.data import load_folder
from aegan_fast.eval import main as eval_main
from aegan_fast.train import train
from conftest import make_image_folder, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    images = make_image_folder(root / "images")
    run = root / "run"
    run.mkdir()
    train(tiny_config(eval_metrics=()), run, progress=False, data=load_folder(images, 64, cache=root / "cache"))
    return run, images


def test_eval_writes_json_and_table(trained, tmp_path, capsys):
    run, images = trained
    out = tmp_path / "eval.json"
    eval_main(["--ckpt", str(run), "--data", str(images), "--metrics", "swd,msssim,fid_efflite,kid_efflite,psnr,l1",
               "--n", "12", "--out", str(out)])
    result = json.loads(out.read_text())
    m = result["metrics"]
    assert result["n"] == 12
    assert m["swd"] > 0 and {"swd_64", "swd_32", "swd_16"} <= set(m)
    assert 0 <= m["msssim"] <= 1 and m["fid_efflite"] > 0 and "kid_efflite_std" in m
    assert 0 < m["l1"] < 2 and 0 < m["psnr"] < 60
    table = capsys.readouterr().out
    assert "fid_efflite" in table and "lower" in table and str(out) in table


def test_eval_bad_metric_is_a_clear_error(trained, capsys):
    run, images = trained
    with pytest.raises(SystemExit) as e:
        eval_main(["--ckpt", str(run), "--data", str(images), "--metrics", "swd,fid"])
    assert e.value.code == 2 and "unknown metric" in capsys.readouterr().err
