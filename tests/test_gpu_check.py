"""The prepared GPU check (:mod:`fasterrcnn.bench.gpu_check`, ``scripts/gpu_check.py``): what it
would run on a GPU, that its timeouts fit the 8-minute budget, and its dry run on the CPU at tiny
sizes, end to end through the script (every part but torch.compile's, which takes ~20 s to
compile here), with the JSON, the table and the copies it writes."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from fasterrcnn.bench.gpu_check import BUDGET_S, MIN_PART_S, PARTS, TIMEOUTS, check, cuda_test_files, plan

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_plan_runs_the_issues_parts(tmp_path):
    parts = {p.name: p for p in plan(tmp_path, device="cuda")}
    assert tuple(parts) == PARTS
    assert sum(TIMEOUTS[name] for name in PARTS if name != "bench_compile") <= BUDGET_S  # compile gets what is left
    tests = parts["tests"].argv
    assert tests[1:5] == ["-m", "pytest", "-q", "-m"] and tests[5] == "cuda" and str(REPO / "tests" / "test_cuda.py") in tests
    assert "tests/test_cuda.py" in {str(Path(f).relative_to(REPO)) for f in cuda_test_files()}
    for name in ("bench_fp32", "bench_bf16", "bench_compile"):
        argv = parts[name].argv
        assert argv[1].endswith("scripts/bench.py") and argv[argv.index("--device") + 1] == "cuda"
        assert {"backbone=vgg16", "anchor=k9", "sampler=default", "data.min_size=600", "data.max_size=1000", "trainer=gpu"} <= set(argv)
        assert argv[argv.index("--image-size") + 1 : argv.index("--image-size") + 3] == ["600", "1000"]
    assert "trainer.precision=bf16-mixed" in parts["bench_bf16"].argv and "--no-memory" not in parts["bench_bf16"].argv
    compiled = parts["bench_compile"].argv
    assert "model.compile=true" in compiled and compiled[len(compiled) - 1 - compiled[::-1].index("--warmup") + 1] == "2"
    train, ddp = parts["train"].argv, parts["ddp"].argv
    assert train[1].endswith("src/train.py") and "trainer=gpu" in train and "trainer.max_steps=300" in train and "trainer.accelerator=cpu" not in train
    assert "trainer=ddp" in ddp and "trainer.devices=1" in ddp
    assert "trainer.benchmark=false" in train and "trainer.benchmark=false" in ddp  # the built-in data's sizes hardly repeat
    assert all("~experiment" not in p.argv for p in (parts["train"], parts["ddp"]))  # the default recipe


def test_a_part_without_time_left_is_skipped_not_started(tmp_path):
    result = check(tmp_path, device="cpu", tiny=True, parts=["data"], budget_s=MIN_PART_S / 2, log=lambda msg: None)
    assert result["parts"]["data"]["status"] == "skipped" and not (tmp_path / "data.log").exists()
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == result and result["measured_on_gpu"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_the_gpu_check_refuses_to_pretend_without_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "no CUDA GPU" in proc.stderr


def test_the_dry_run_on_the_cpu_runs_every_part_and_reads_its_figures(tmp_path):
    parts = [p for p in PARTS if p != "bench_compile"]
    out, copy = tmp_path / "run", tmp_path / "copy"
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--tiny", "--out", str(out), "--copy-to", str(copy), "--parts", *parts]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["measured_on_gpu"] is False and "dry run" in proc.stdout and "no GPU figure" in proc.stdout
    assert list(result["parts"]) == parts
    assert all(result["parts"][p]["status"] == "ok" for p in parts), {p: result["parts"][p]["log_tail"][-800:] for p in parts if result["parts"][p]["status"] != "ok"}
    assert sum(r["timeout_s"] for r in result["parts"].values()) <= result["budget_s"]
    tests = result["parts"]["tests"]["figures"]
    assert tests["skipped"] == tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0  # every CUDA test skips here
    for name, precision in (("bench_fp32", "32-true"), ("bench_bf16", "bf16-mixed")):
        f = result["parts"][name]["figures"]
        assert f["settings"]["precision"] == precision and f["image_size"] == [96, 128]
        assert set(f["train_img_per_s"]) == {"ours", "torchvision", "torchvision_same"} and all(v > 0 for v in f["infer_img_per_s"].values())
        assert f["train_ratio"] > 0 and "backbone" in f["split_ms"]["train_forward"] and f["data"]["ratio"] > 0
    for name, steps in (("train", 3), ("ddp", 2)):
        f = result["parts"][name]["figures"]
        assert f["status"] == "completed" and f["steps"] == steps and 0.0 <= f["val_map"] <= 1.0 and f["steps_per_s"] > 0
    assert (out / "gpu_check.txt").read_text().strip() in proc.stdout
    assert json.loads((copy / "gpu_check.json").read_text()) == result and (copy / "gpu_check.txt").is_file()
    with tarfile.open(copy / "gpu_check_run.tar.gz") as tar:
        names = tar.getnames()
    assert {f"{out.name}/{f}" for f in ("gpu_check.json", "data.log", "tests.xml", "bench_fp32.json", "train/metrics.json")} <= set(names)
    assert not any(n.endswith(".ckpt") or n.startswith(f"{out.name}/data/") for n in names)  # no checkpoints, no data
