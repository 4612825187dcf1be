"""The floor (:mod:`fasterrcnn.bench.floor`, ``scripts/floor.py``): the dense layers' FLOPs are
counted as the layers' arithmetic, the run's steps and validations are the Trainer's, and the
figures it reports are consistent with each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fasterrcnn.bench.floor import FloorOptions, dense_flops, gemm_gflops, project_run, run, run_counts

from .conftest import SMALL_DATA, compose_config
from .test_faults import FEW_PROPOSALS, TINY_NET

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_flops_are_the_layers_multiply_adds(channels_last):
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    x = torch.randn(1, 8, 20, 30)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    forward = 2 * 16 * 8 * 9 * 10 * 15  # 2 x Cout x Cin x k^2 x output cells
    assert dense_flops(lambda: conv(x))[0] == forward
    # backward: the weights' gradient, and the input's when it needs one
    assert dense_flops(lambda: conv(x).sum().backward())[0] == 2 * forward
    x.requires_grad_(True)
    assert dense_flops(lambda: conv(x).sum().backward())[0] == 3 * forward
    fc = nn.Linear(64, 10)
    flops, out = dense_flops(lambda: fc(torch.randn(5, 64)))
    assert flops == 2 * 5 * 64 * 10 and out.shape == (5, 10)


def test_gemm_rate_is_positive():
    assert gemm_gflops(size=64, repeats=2) > 0


@pytest.mark.parametrize(
    ("overrides", "batches", "expected"),
    [
        (["trainer.max_epochs=5", "trainer.check_val_every_n_epoch=5"], 1000, (5000, 1)),  # the default run
        (["trainer.max_epochs=5", "trainer.check_val_every_n_epoch=2"], 1000, (5000, 3)),  # epochs 2, 4 and after the last
        (["trainer.max_epochs=24", "trainer.check_val_every_n_epoch=2"], 225, (5400, 12)),
        (["trainer.max_epochs=5", "trainer.max_steps=600", "trainer.check_val_every_n_epoch=1"], 200, (600, 3)),
        (["trainer.max_epochs=5", "trainer.max_steps=500", "trainer.check_val_every_n_epoch=1"], 200, (500, 3)),  # 2 epochs, then the final weights
        (["trainer.max_epochs=5", "trainer.max_steps=600", "trainer.check_val_every_n_epoch=5"], 200, (600, 1)),
    ],
)
def test_run_counts_are_the_trainers_steps_and_validations(overrides, batches, expected):
    assert run_counts(compose_config(overrides), batches) == expected


def test_project_run_multiplies_the_means():
    train = {"dense_s": 0.05, "step_s": 0.08, "loader_s": 0.01}
    val = {"dense_s": 0.02, "step_s": 0.06}
    run_ = project_run(steps=1000, validations=2, val_images=100, train=train, val=val)
    assert run_["dense_floor_training_s"] == pytest.approx(50.0) and run_["dense_floor_validation_s"] == pytest.approx(4.0)
    assert run_["projected_training_s"] == pytest.approx(90.0) and run_["projected_validation_s"] == pytest.approx(12.0)
    assert run_["dense_floor_s"] == pytest.approx(54.0) and run_["projected_s"] == pytest.approx(102.0)


@pytest.fixture(scope="module")
def floor(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("floor") / "floor.json"
    overrides = [*TINY_NET, *SMALL_DATA, *FEW_PROPOSALS, f"paths.data_dir={data_dir}", "data.min_size=128", "data.max_size=200"]
    lines: list[str] = []
    threads = torch.get_num_threads()
    result = run(overrides, FloorOptions(images=2, warmup=1, threads="2", out=str(out)), log=lines.append)
    assert torch.get_num_threads() == threads  # restored
    return {"result": result, "json": json.loads(out.read_text()), "log": "\n".join(lines)}


def test_floor_writes_what_it_returns_and_prints_the_table(floor):
    assert floor["json"] == json.loads(json.dumps(floor["result"]))
    for label in ("whole step (ms)", "dense layers alone (ms)", "dense GFLOP/s", "one-thread step / step", "fp32 GEMM GFLOP/s", "the run: "):
        assert label in floor["log"]


def test_floor_figures_are_consistent(floor):
    result = floor["result"]
    assert result["threads"] == 2 and set(result["gemm_gflops"]) == {"threads", "one_thread"}
    for part in ("train", "validation"):
        fig = result[part]
        assert fig["images"] == 2 and fig["flops"] > 0 and fig["step_s"] > 0
        assert fig["dense_s"] == pytest.approx(fig["trunk"] + fig["rpn_head"] + fig["roi_head_layers"])
        assert fig["dense_gflops"] == pytest.approx(fig["flops"] / fig["dense_s"] / 1e9)
        assert fig["dense_share"] == pytest.approx(fig["dense_s"] / fig["step_s"])
        assert fig["one_core_ratio"] == pytest.approx(fig["one_thread"]["step_s"] / fig["step_s"])
        assert fig["dense_speedup"] == pytest.approx(fig["one_thread"]["dense_s"] / fig["dense_s"])
    assert result["train"]["loader_s"] > 0 and result["validation"]["rois"] > 0
    run_ = result["run"]  # experiment=cpu_shapes: 5 epochs of the 24 training images, validated after the last
    assert (run_["steps"], run_["validations"], run_["val_images"]) == (5 * 24, 1, 8)
    assert run_ == project_run(120, 1, 8, result["train"], result["validation"])


@pytest.mark.parametrize(("args", "message"), [(["--image", "2"], "--image"), (["--images", "0"], "--images"), (["--ckpt", "nowhere.ckpt"], "nowhere.ckpt")])
def test_floor_script_rejects_bad_options(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "floor.py"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and message in proc.stderr
