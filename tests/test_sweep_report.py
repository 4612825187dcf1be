"""scripts/sweep_report.py: the table, CSV and plot of a multirun, on fake and on real sweeps."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SMALL_DATA

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "sweep_report.py"

_spec = importlib.util.spec_from_file_location("sweep_report", SCRIPT)
sweep_report = importlib.util.module_from_spec(_spec)
sys.modules["sweep_report"] = sweep_report  # dataclasses look the module up by name
_spec.loader.exec_module(sweep_report)

ERROR = "ValueError('unknown optimizer nosuchoptimizer: expected one of sgd, adamw; " + "x" * 200 + "')"


def _metrics(status, overrides, best=None, final=None, error=None, steps=3, time_s=12.5):
    return {
        "status": status,
        "error": error,
        "monitor": "val/map",
        "final": final or {},
        "best": best or {},
        "epochs": 1,
        "steps": steps,
        "train_time_s": time_s,
        "checkpoints": {"best": None, "last": None},
        "overrides": overrides,
        "output_dir": None,
    }


def _job(sweep: Path, num: int, metrics: dict | None, overrides: list[str]) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def fake_sweep(root: Path, recall: bool = False) -> Path:
    """Jobs 0 and 2 completed, job 1 failed; `anchor` swept, `optim.lr` fixed."""
    sweep = root / "sweep"
    fixed = "optim.lr=0.001"
    r0 = {"val/recall@300": 0.8, "val/recall@1000": 0.9} if recall else {}
    r2 = {"val/recall@300": 0.7, "val/recall@1000": 0.85} if recall else {}
    _job(sweep, 0, _metrics("completed", ["anchor=k9", fixed], best={"val/map": 0.5, **r0}, final={"val/map": 0.45, **r0}), ["anchor=k9", fixed])
    _job(sweep, 1, _metrics("failed", ["anchor=k15", fixed], error=ERROR, steps=0, time_s=1.0), ["anchor=k15", fixed])
    _job(sweep, 2, _metrics("completed", ["anchor=small", fixed], best={"val/map": 0.75, **r2}, final={"val/map": 0.7, **r2}), ["anchor=small", fixed])
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_fixed_and_swept_keys_and_rows(tmp_path):
    sweep = fake_sweep(tmp_path)
    text, table = sweep_report.report(sweep)
    assert table.swept == ["anchor"] and table.fixed == {"optim.lr": "0.001"}
    assert table.columns == ["job", "anchor", "status", "best val/map", "final val/map", "steps", "train time (s)", "error"]
    assert [r["anchor"] for r in table.rows] == ["k9", "k15", "small"]
    assert [r["status"] for r in table.rows] == ["completed", "failed", "completed"]
    assert [r["best val/map"] for r in table.rows] == [0.5, None, 0.75]
    assert "Fixed overrides (the same in every job): `optim.lr=0.001`" in text
    assert "Best val/map: 0.7500 (job 2: anchor=small)" in text

    lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert lines[0] == "| job | anchor | status | best val/map | final val/map | steps | train time (s) | error |"
    assert lines[1].startswith("| 0 | k9 | completed | 0.5000 | 0.4500 | 3 | 12.5 |")
    assert lines[3].startswith("| 2 | small | completed | 0.7500 | 0.7000 | 3 | 12.5 |")
    failed = lines[2]
    assert failed.startswith("| 1 | k15 | **FAILED** | – | – | 0 | 1.0 | ValueError('unknown optimizer nosuchoptimizer")
    assert "…" in failed and "x" * 100 not in failed  # the error is shortened
    assert (sweep / "report.md").read_text() == text


def test_csv_has_the_same_columns_and_the_full_error(tmp_path):
    sweep = fake_sweep(tmp_path)
    sweep_report.report(sweep)
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert list(rows[0]) == ["job", "anchor", "status", "best val/map", "final val/map", "steps", "train time (s)", "error"]
    assert [(r["job"], r["anchor"], r["status"]) for r in rows] == [("0", "k9", "completed"), ("1", "k15", "failed"), ("2", "small", "completed")]
    assert float(rows[2]["best val/map"]) == 0.75 and rows[1]["best val/map"] == ""
    assert rows[1]["error"] == ERROR and rows[0]["error"] == ""


def test_png_is_written_with_and_without_recall(tmp_path):
    from PIL import Image

    plain = fake_sweep(tmp_path / "a")
    sweep_report.report(plain)
    with_recall = fake_sweep(tmp_path / "b", recall=True)
    _, table = sweep_report.report(with_recall, out=tmp_path / "out")
    assert table.recall == ["val/recall@300", "val/recall@1000"]  # natural order
    assert "best val/recall@300" in table.columns and table.rows[0]["best val/recall@1000"] == 0.9
    one, two = Image.open(plain / "report.png"), Image.open(tmp_path / "out" / "report.png")
    assert one.size[0] > 100 and two.size[1] > one.size[1]  # the recall panel is below
    assert not (with_recall / "report.md").exists() and (tmp_path / "out" / "report.csv").is_file()


def test_jobs_sorted_numerically_and_missing_metrics_fall_back_to_hydra_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    for num in (0, 2, 10):
        _job(sweep, num, _metrics("completed", [f"optim.lr={num}"], best={"val/map": 0.1}), [f"optim.lr={num}"])
    _job(sweep, 3, None, ["optim.lr=3"])  # killed hard before metrics.json
    _job(sweep, 4, _metrics("running", ["optim.lr=4"]), ["optim.lr=4"])  # killed mid-training
    _, table = sweep_report.report(sweep)
    assert [r["job"] for r in table.rows] == [0, 2, 3, 4, 10]
    assert [r["optim.lr"] for r in table.rows] == ["0", "2", "3", "4", "10"]
    assert table.rows[2]["status"] == "missing" and table.rows[3]["status"] == "running"
    assert table.fixed == {}


def test_keys_the_sweep_declared_are_swept_even_when_the_jobs_agree(tmp_path):
    """Optuna may draw the same value for every trial; the sweeper's params still say it is swept."""
    sweep = tmp_path / "sweep"
    for num, anchor in ((0, "k9"), (1, "small")):
        overrides = [f"anchor={anchor}", "sampler.proposal_target.n_sample=128", "logger=none"]
        _job(sweep, num, _metrics("completed", overrides, best={"val/map": 0.1 * (num + 1)}), overrides)
    (sweep / "0" / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      anchor: choice(k9, small)\n      sampler.proposal_target.n_sample: choice(64, 128)\n"
    )
    (sweep / "optimization_results.yaml").write_text("name: optuna\nbest_params:\n  anchor: small\nbest_value: 0.2\n")
    text, table = sweep_report.report(sweep)
    assert table.swept == ["anchor", "sampler.proposal_target.n_sample"] and table.fixed == {"logger": "none"}
    assert "Optuna's best trial (optimization_results.yaml): 0.2 with anchor=small." in text

    # A basic sweep: multirun.yaml keeps the command line, `anchor=k9,k15` is a sweep, a list is not.
    sweep = tmp_path / "basic"
    for num in (0, 1):
        overrides = ["anchor=k9", "backbone.widths=[8,16,16,32]"]
        _job(sweep, num, _metrics("completed", overrides), overrides)
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - anchor=k9,k9\n    - backbone.widths=[8,16,16,32]\n")
    _, table = sweep_report.report(sweep)
    assert table.swept == ["anchor"] and table.fixed == {"backbone.widths": "[8,16,16,32]"}


def test_plot_labels_use_the_shortest_unambiguous_key():
    keys = ["anchor", "sampler.anchor_target.n_sample", "sampler.proposal_target.n_sample", "optim.lr"]
    assert sweep_report.short_keys(keys) == {
        "anchor": "anchor",
        "sampler.anchor_target.n_sample": "anchor_target.n_sample",
        "sampler.proposal_target.n_sample": "proposal_target.n_sample",
        "optim.lr": "lr",
    }


def test_no_job_folders_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "multirun.yaml").write_text("{}\n")
    with pytest.raises(sweep_report.SweepError, match="no job folders"):
        sweep_report.report(tmp_path / "empty")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "empty")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no job folders" in proc.stderr and "Traceback" not in proc.stderr


def test_real_tiny_sweep_then_report(tmp_path, data_dir):
    """A real two-job multirun through src/train.py, then the report script on it."""
    tiny = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
    few = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.max_epochs=1", "data.num_workers=0"]
    sweep = tmp_path / "sweep"
    args = ["-m", "anchor=k9,k15", f"paths.data_dir={data_dir}", "logger=none", *SMALL_DATA, *tiny, *few, f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = subprocess.run([sys.executable, str(SCRIPT), str(sweep)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    # validation logs proposal recall, so the report has its columns (300/1000/2000 at IoU 0.5/0.7)
    assert rows[0].startswith("| job | anchor | status | best val/map | final val/map | best val/recall/300@0.5 | best val/recall/300@0.7 |")
    assert rows[0].endswith("| steps | train time (s) |")
    assert rows[1].startswith("| 0 | k9 | completed | ") and rows[2].startswith("| 1 | k15 | completed | ")
    assert len(rows) == 3
    assert "`logger=none`" in proc.stdout and "`trainer.max_steps=2`" in proc.stdout  # fixed overrides
    for name in ("report.md", "report.csv", "report.png"):
        assert (sweep / name).is_file()
    print(proc.stdout)
