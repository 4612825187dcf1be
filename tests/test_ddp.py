"""DDP: two CPU processes (gloo) through the real command line, as `trainer=ddp` runs on GPUs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import SMALL_DATA
from .test_faults import FEW_PROPOSALS, TINY_NET

REPO = Path(__file__).resolve().parents[1]


def test_ddp_cpu_two_processes_one_run_folder_metrics_over_all_images(tmp_path, data_dir):
    lr = 1e-3
    args = [
        "trainer=ddp_cpu",
        f"paths.data_dir={data_dir}",
        *SMALL_DATA,  # 24 training images (12 per process), 8 validation images (4 per process)
        *TINY_NET,
        "data.min_size=128",
        "data.max_size=200",
        *FEW_PROPOSALS,
        "logger=csv",
        "trainer.log_every_n_steps=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.enable_progress_bar=false",
        f"optim.lr={lr}",
        "optim.warmup_steps=0",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # One Hydra output folder for the run, whatever the number of processes.
    runs = [p for p in (tmp_path / "outputs" / "runs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]  # nothing written beside it
    run = runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    # 3 steps per process; the mAP is over all 8 validation images, not one process's 4.
    assert metrics["steps"] == 3 and metrics["final"]["val/num_images"] == 8
    assert 0.0 <= metrics["final"]["val/map"] <= 1.0
    # One CSV log, written by rank 0; lr x 2 processes (linear scaling rule).
    assert len(list(run.rglob("metrics.csv"))) == 1
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    lrs = {float(r[k]) for r in rows for k in r if k.startswith("lr-") and r[k] and not k.endswith("pg2")}
    assert lrs == {2 * lr}, lrs
    assert sum(1 for r in rows if r.get("train/loss")) == 3
