"""fasterrcnn.sweeps (scripts/sweep_report.py): the table, the repeats' statistics, the CSV and the
plot of a multirun, on sweeps built from metrics.json files and on a real one; and model
selection off the test split (``selection``, ``data.val_holdout``, ``objective``)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import InstantiationException

from fasterrcnn import sweeps
from fasterrcnn.build import build_datamodule
from fasterrcnn.data import DatasetError
from fasterrcnn.data.datamodule import in_holdout
from fasterrcnn.metrics_file import find_runs, read_run
from fasterrcnn.training import selected_on, train

from .conftest import SMALL_DATA, compose_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "sweep_report.py"
TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
FEW_STEPS = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.max_epochs=1", "data.num_workers=0"]

ERROR = "ValueError('unknown optimizer nosuchoptimizer: expected one of sgd, adamw; " + "x" * 200 + "')"
JOBS_COLUMNS = ["job", "anchor", "status", "final val/map", "best val/map", "steps", "train time (s)"]


def _metrics(status, overrides, best=None, final=None, error=None, steps=3, time_s=12.5, selected_on=None):
    return {
        "status": status,
        "error": error,
        "monitor": "val/map",
        "selected_on": selected_on,
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


# Two configurations x 3 seeds and a third with its last seed failed; the numbers by hand below.
SEEDED = {"k9": [0.50, 0.52, 0.54], "small": [0.60, 0.62, 0.64], "k15": [0.53, 0.55, None]}


def seeded_sweep(root: Path, key: str = "seed", on_test: bool = False) -> Path:
    sweep = root / "seeded"
    num = 0
    for anchor, values in SEEDED.items():
        for seed, value in enumerate(values):
            overrides = [f"anchor={anchor}", f"{key}={seed}", "logger=none"]
            sets = {"sets": ["VOC2007/test"] if on_test else ["shapes/val"], "is_test": on_test}
            if value is None:
                metrics = _metrics("failed", overrides, error="RuntimeError('out of memory')", selected_on=sets)
            else:  # best is 0.1 above final, so the tests can tell which one is scored
                metrics = _metrics("completed", overrides, best={"val/map": value + 0.1}, final={"val/map": value}, selected_on=sets)
            _job(sweep, num, metrics, overrides)
            num += 1
    (sweep / "multirun.yaml").write_text(f"hydra:\n  overrides:\n    task:\n    - anchor=k9,small,k15\n    - {key}=0,1,2\n    - logger=none\n")
    return sweep


# --------------------------------------------------------------------------- the statistics


def _coverage(q: float, df: float) -> float:
    """P(|T| < q) for Student's t with df degrees of freedom, by integrating its density."""
    t = torch.distributions.StudentT(torch.tensor(df, dtype=torch.float64))
    x = torch.linspace(0.0, q, 20001, dtype=torch.float64)
    return 2 * float(torch.trapezoid(t.log_prob(x).exp(), x))


@pytest.mark.parametrize("df", [*range(1, 31), 31, 40, 60, 120, 1000])
def test_t_quantiles_are_students(df):
    """The table (4 decimals) and the expansion beyond it: 95% of the mass lies within ±t."""
    q = sweeps.t_quantile(df)
    assert _coverage(q - 1e-4, df) < 0.95 < _coverage(q + 1e-4, df)


def test_summary_by_hand():
    s = sweeps.summarize([0.5, 0.6, 0.7])
    assert s.n == 3 and s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1)  # sqrt((0.01 + 0 + 0.01) / 2)
    assert (s.low, s.high) == pytest.approx((0.6 - 4.3027 * 0.1 / math.sqrt(3), 0.6 + 4.3027 * 0.1 / math.sqrt(3)))
    two = sweeps.summarize([0.8, 0.9])  # std = 0.05 * sqrt(2); half width 12.7062 * std / sqrt(2)
    assert two.std == pytest.approx(0.0707107, abs=1e-7) and two.high - two.mean == pytest.approx(12.7062 * 0.05)
    assert sweeps.summarize([0.4]) == sweeps.Summary(1, 0.4)  # one value: no spread, no interval
    assert sweeps.summarize([]) == sweeps.Summary(0)
    assert sweeps.overlap(s, two) is True and sweeps.overlap(s, sweeps.summarize([0.4])) is None
    assert sweeps.overlap(sweeps.summarize([0.1, 0.11]), sweeps.summarize([1.0, 1.01])) is False


# --------------------------------------------------------------------------- repeats


def test_seeds_are_grouped_with_mean_std_interval_and_the_overlap_flag(tmp_path):
    text, table = sweeps.report(seeded_sweep(tmp_path))
    assert table.repeat_key == "seed" and table.swept == ["anchor", "seed"] and table.fixed == {"logger": "none"}
    k9, small, k15 = table.configs
    assert [c.label() for c in table.configs] == ["anchor=k9", "anchor=small", "anchor=k15"]
    # k9: mean 0.52, std 0.02, 95%: 0.52 ± 4.3027 * 0.02 / sqrt(3) = 0.52 ± 0.049683
    assert (k9.summary.n, k9.summary.mean, k9.summary.std) == (3, pytest.approx(0.52), pytest.approx(0.02))
    assert (k9.summary.low, k9.summary.high) == pytest.approx((0.470317, 0.569683), abs=1e-6)
    assert (small.summary.low, small.summary.high) == pytest.approx((0.570317, 0.669683), abs=1e-6)
    # k15: the failed seed is counted, not averaged: n = 2, mean 0.54, 0.54 ± 12.7062 * 0.01414 / sqrt(2)
    assert (k15.summary.n, len(k15.runs), [r.status for r in k15.not_completed]) == (2, 3, ["failed"])
    assert (k15.summary.mean, k15.summary.low, k15.summary.high) == pytest.approx((0.54, 0.54 - 0.127062, 0.54 + 0.127062), abs=1e-6)

    assert "Highest mean final val/map: 0.6200 ± 0.0200 (`anchor=small`, n=3)." in text
    assert "| k9 | 3 | 0 | 0.5200 ± 0.0200 | [0.4703, 0.5697] | 0: 0.5000, 1: 0.5200, 2: 0.5400 |" in text
    assert "| k15 | 2 | **1** | 0.5400 ± 0.0141 | [0.4129, 0.6671] | 0: 0.5300, 1: 0.5500, 2: FAILED |" in text
    assert "`anchor=k15`: 1 of 3 jobs did not complete (seed=2 failed); the mean is over the other 2." in text
    # k9's interval ends at 0.5697, small's starts at 0.5703: apart; k15's overlaps both
    assert "- `anchor=k9` vs `anchor=small`: separated (the 95% intervals do not overlap); `anchor=small` is higher." in text
    assert "- `anchor=k9` vs `anchor=k15`: the 95% intervals overlap: **not separable with these seeds**." in text
    assert "- `anchor=small` vs `anchor=k15`: the 95% intervals overlap: **not separable with these seeds**." in text

    rows = list(csv.DictReader((tmp_path / "seeded" / "report_configs.csv").open()))
    assert [(r["anchor"], r["n"], r["not completed"], r["jobs"]) for r in rows] == [("k9", "3", "0", "0 1 2"), ("small", "3", "0", "3 4 5"), ("k15", "2", "1", "6 7 8")]
    assert float(rows[0]["mean"]) == pytest.approx(0.52) and float(rows[0]["std"]) == pytest.approx(0.02)
    assert float(rows[2]["low95"]) == pytest.approx(0.412938, abs=1e-6) and float(rows[2]["high95"]) == pytest.approx(0.667062, abs=1e-6)
    assert len(list(csv.DictReader((tmp_path / "seeded" / "report.csv").open()))) == 9  # one row per job still


def test_the_plot_has_error_bars_per_configuration(tmp_path, monkeypatch):
    import matplotlib.axes

    calls = []
    original = matplotlib.axes.Axes.errorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", lambda self, x, y, **kw: calls.append((x, y, kw["yerr"])) or original(self, x, y, **kw))
    sweeps.report(seeded_sweep(tmp_path))
    assert [(x, round(y, 4)) for x, y, _ in calls] == [(0, 0.52), (1, 0.62), (2, 0.54)]
    assert calls[0][2] == [[pytest.approx(0.049683, abs=1e-6)], [pytest.approx(0.049683, abs=1e-6)]]
    from PIL import Image

    assert Image.open(tmp_path / "seeded" / "report.png").size[0] > 100


def test_any_key_can_be_the_repeat_key(tmp_path):
    sweep = seeded_sweep(tmp_path, key="data.builtin.seed")
    _, table = sweeps.report(sweep)  # `seed` is not swept: one configuration per job
    assert table.repeat_key is None and len(table.configs) == 9
    text, table = sweeps.report(sweep, repeat_key="data.builtin.seed")
    assert [c.summary.n for c in table.configs] == [3, 3, 2] and "Configurations over `data.builtin.seed`" in text
    assert "not separable with these data.builtin.seeds" in text
    proc = subprocess.run([sys.executable, str(SCRIPT), str(sweep), "--repeat-key", "data.builtin.seed", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 0 and "| k9 | 3 | 0 | 0.5200 ± 0.0200 |" in proc.stdout, proc.stderr


def test_final_is_scored_unless_told_and_best_on_test_is_flagged(tmp_path):
    sweep = seeded_sweep(tmp_path, on_test=True)
    text, table = sweeps.report(sweep)
    assert table.column == "final val/map" and table.configs[0].summary.mean == pytest.approx(0.52)
    assert "Warning" not in text
    text, table = sweeps.report(sweep, use="best")
    assert table.column == "best val/map" and table.columns[4:6] == ["best val/map", "final val/map"]
    assert table.configs[0].summary.mean == pytest.approx(0.62)  # best = final + 0.1
    assert "**Warning**: 8 jobs chose `best` on the test split" in text
    with pytest.raises(ValueError, match="use must be one of final, best"):
        sweeps.report(sweep, use="last")


def test_the_optuna_objective_is_final_unless_told():
    metrics = {"final": {"val/map": 0.4}, "best": {"val/map": 0.5}}
    assert sweeps.objective(metrics) == 0.4 and sweeps.objective(metrics, "best") == 0.5
    assert math.isnan(sweeps.objective({"final": {}, "best": {}}))
    with pytest.raises(ValueError, match="objective must be one of final, best"):
        sweeps.objective(metrics, "test")
    assert compose_config(["paths.output_dir=/tmp/unused"]).objective == "final"


# --------------------------------------------------------------------------- one number per job


def test_fixed_and_swept_keys_and_rows(tmp_path):
    sweep = fake_sweep(tmp_path)
    text, table = sweeps.report(sweep)
    assert table.swept == ["anchor"] and table.fixed == {"optim.lr": "0.001"} and table.repeat_key is None
    assert table.columns == [*JOBS_COLUMNS, "error"]
    assert [r["anchor"] for r in table.rows] == ["k9", "k15", "small"]
    assert [r["status"] for r in table.rows] == ["completed", "failed", "completed"]
    assert [r["final val/map"] for r in table.rows] == [0.45, None, 0.7]
    assert "Fixed overrides (the same in every job): `optim.lr=0.001`" in text
    assert "Highest final val/map: 0.7000 (job 2: anchor=small)" in text and "Configurations over" not in text

    lines = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert lines[0] == "| job | anchor | status | final val/map | best val/map | steps | train time (s) | error |"
    assert lines[1].startswith("| 0 | k9 | completed | 0.4500 | 0.5000 | 3 | 12.5 |")
    assert lines[3].startswith("| 2 | small | completed | 0.7000 | 0.7500 | 3 | 12.5 |")
    failed = lines[2]
    assert failed.startswith("| 1 | k15 | **FAILED** | – | – | 0 | 1.0 | ValueError('unknown optimizer nosuchoptimizer")
    assert "…" in failed and "x" * 100 not in failed  # the error is shortened
    assert (sweep / "report.md").read_text() == text and not (sweep / "report_configs.csv").exists()


def test_csv_has_the_same_columns_and_the_full_error(tmp_path):
    sweep = fake_sweep(tmp_path)
    sweeps.report(sweep)
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert list(rows[0]) == [*JOBS_COLUMNS, "error"]
    assert [(r["job"], r["anchor"], r["status"]) for r in rows] == [("0", "k9", "completed"), ("1", "k15", "failed"), ("2", "small", "completed")]
    assert float(rows[2]["final val/map"]) == 0.7 and rows[1]["final val/map"] == ""
    assert rows[1]["error"] == ERROR and rows[0]["error"] == ""


def test_png_is_written_with_and_without_recall(tmp_path):
    from PIL import Image

    plain = fake_sweep(tmp_path / "a")
    sweeps.report(plain)
    with_recall = fake_sweep(tmp_path / "b", recall=True)
    _, table = sweeps.report(with_recall, out=tmp_path / "out")
    assert table.recall == ["val/recall@300", "val/recall@1000"]  # natural order
    assert "final val/recall@300" in table.columns and table.rows[0]["final val/recall@1000"] == 0.9
    one, two = Image.open(plain / "report.png"), Image.open(tmp_path / "out" / "report.png")
    assert one.size[0] > 100 and two.size[1] > one.size[1]  # the recall panel is below
    assert not (with_recall / "report.md").exists() and (tmp_path / "out" / "report.csv").is_file()


def test_jobs_sorted_numerically_and_missing_metrics_fall_back_to_hydra_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    for num in (0, 2, 10):
        _job(sweep, num, _metrics("completed", [f"optim.lr={num}"], final={"val/map": 0.1}), [f"optim.lr={num}"])
    _job(sweep, 3, None, ["optim.lr=3"])  # killed hard before metrics.json
    _job(sweep, 4, _metrics("running", ["optim.lr=4"]), ["optim.lr=4"])  # killed mid-training
    assert [r.num for r in find_runs(sweep)] == [0, 2, 3, 4, 10]
    missing = read_run(sweep / "3")
    assert missing.status == "missing" and missing.overrides == {"optim.lr": "3"} and "no metrics.json" in missing.error
    _, table = sweeps.report(sweep)
    assert [r["job"] for r in table.rows] == [0, 2, 3, 4, 10]
    assert [r["optim.lr"] for r in table.rows] == ["0", "2", "3", "4", "10"]
    assert table.rows[2]["status"] == "missing" and table.rows[3]["status"] == "running"
    assert table.fixed == {}


def test_keys_the_sweep_declared_are_swept_even_when_the_jobs_agree(tmp_path):
    """Optuna may draw the same value for every trial; the sweeper's params still say it is swept."""
    sweep = tmp_path / "sweep"
    for num, anchor in ((0, "k9"), (1, "small")):
        overrides = [f"anchor={anchor}", "sampler.proposal_target.n_sample=128", "logger=none"]
        _job(sweep, num, _metrics("completed", overrides, final={"val/map": 0.1 * (num + 1)}), overrides)
    (sweep / "0" / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  sweeper:\n    params:\n      anchor: choice(k9, small)\n      sampler.proposal_target.n_sample: choice(64, 128)\n"
    )
    (sweep / "optimization_results.yaml").write_text("name: optuna\nbest_params:\n  anchor: small\nbest_value: 0.2\n")
    text, table = sweeps.report(sweep)
    assert table.swept == ["anchor", "sampler.proposal_target.n_sample"] and table.fixed == {"logger": "none"}
    assert "Optuna's best trial (optimization_results.yaml): 0.2 with anchor=small." in text

    # A basic sweep: multirun.yaml keeps the command line, `anchor=k9,k15` is a sweep, a list is not.
    sweep = tmp_path / "basic"
    for num in (0, 1):
        overrides = ["anchor=k9", "backbone.widths=[8,16,16,32]"]
        _job(sweep, num, _metrics("completed", overrides), overrides)
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - anchor=k9,k9\n    - backbone.widths=[8,16,16,32]\n")
    _, table = sweeps.report(sweep)
    assert table.swept == ["anchor"] and table.fixed == {"backbone.widths": "[8,16,16,32]"}


def test_plot_labels_use_the_shortest_unambiguous_key():
    keys = ["anchor", "sampler.anchor_target.n_sample", "sampler.proposal_target.n_sample", "optim.lr"]
    assert sweeps.short_keys(keys) == {
        "anchor": "anchor",
        "sampler.anchor_target.n_sample": "anchor_target.n_sample",
        "sampler.proposal_target.n_sample": "proposal_target.n_sample",
        "optim.lr": "lr",
    }


def test_no_job_folders_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "multirun.yaml").write_text("{}\n")
    with pytest.raises(sweeps.SweepError, match="no job folders"):
        sweeps.report(tmp_path / "empty")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "empty")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no job folders" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- model selection


@pytest.mark.parametrize("experiment", ["voc07_vgg16", "voc0712_vgg16", "voc07_resnet101"])
def test_voc_experiments_do_not_select_on_the_test_split(experiment, tmp_path, caplog):
    """Their validation set is VOC2007 test: nothing is selected on it (best = final)."""
    cfg = compose_config([f"paths.output_dir={tmp_path}", f"experiment={experiment}"])
    datamodule = build_datamodule(cfg)
    assert datamodule.val_is_test and datamodule.set_names("val") == ["VOC2007/test"]
    assert cfg.selection == "none" and [s.split for s in cfg.data.train_sets][:1] == ["trainval"]  # the paper's training set
    assert selected_on(cfg.selection, datamodule) is None
    # selection=val there would choose on test: metrics.json says so, and a warning
    assert selected_on("val", datamodule) == {"sets": ["VOC2007/test"], "is_test": True}
    assert "also the test split" in caplog.text
    # Selection, when wanted, on a holdout of the training images instead
    cfg = compose_config([f"paths.output_dir={tmp_path}", f"experiment={experiment}", "selection=val", "data.val_holdout=0.05"])
    datamodule = build_datamodule(cfg)
    assert not datamodule.val_is_test and datamodule.set_names("val")[0] == "holdout 5% of VOC2007/trainval"


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_no_experiment_selects_on_its_test_split(experiment, tmp_path):
    cfg = compose_config([f"paths.output_dir={tmp_path}", f"experiment={experiment}"])
    assert cfg.selection == "none" or not build_datamodule(cfg).val_is_test


def test_val_holdout_is_a_fixed_part_of_the_training_split(make_cfg):
    plain = build_datamodule(make_cfg())
    plain.prepare_data()
    plain.setup("fit")
    train_ids = list(plain.datasets["train"].voc.ids)
    held = build_datamodule(make_cfg(["data.val_holdout=0.25", "seed=7"]))
    held.setup("fit")
    val, rest = held.datasets["val"].voc.ids, held.datasets["train"].voc.ids
    assert val == [i for i in train_ids if in_holdout(i, 0.25)] and rest == [i for i in train_ids if not in_holdout(i, 0.25)]
    assert 0 < len(val) < len(train_ids) and not set(val) & set(rest)
    assert held.datasets["val"].flip_prob == 0.0 and held.set_names("val") == ["holdout 25% of shapes/train"]
    # the hash of the id alone: the same images at any seed, and nested as the fraction grows
    assert [i for i in train_ids if in_holdout(i, 0.1)] == [i for i in val if in_holdout(i, 0.1)]
    with pytest.raises(DatasetError, match="data.val_holdout=1e-09: no val image left"):
        build_datamodule(make_cfg(["data.val_holdout=1e-9"])).setup("fit")
    with pytest.raises(InstantiationException, match="data.val_holdout is a fraction"):
        build_datamodule(make_cfg(["data.val_holdout=1.5"]))


def test_metrics_json_says_which_split_selected_best(make_cfg):
    metrics = train(make_cfg(TINY_NET + FEW_STEPS))
    assert metrics["monitor"] == "val/map" and metrics["selected_on"] == {"sets": ["shapes/val"], "is_test": False}
    cfg = make_cfg(TINY_NET + FEW_STEPS + ["selection=none", "+trainer.val_check_interval=1"])
    metrics = train(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["monitor"] is None and on_disk["selected_on"] is None
    assert on_disk["best"] == on_disk["final"] and on_disk["final"]["step"] == 2  # best is the final model
    with pytest.raises(ValueError, match="selection must be one of val, none"):
        train(make_cfg(TINY_NET + FEW_STEPS + ["selection=test"]))


# --------------------------------------------------------------------------- a real sweep


def test_real_tiny_sweep_with_seeds_then_report(tmp_path, data_dir):
    """A real 2 configurations x 2 seeds multirun through src/train.py, then the report script."""
    sweep = tmp_path / "sweep"
    args = ["-m", "anchor=k9,k15", "seed=0,1", f"paths.data_dir={data_dir}", "logger=none", *SMALL_DATA, *TINY_NET, *FEW_STEPS, f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = subprocess.run([sys.executable, str(SCRIPT), str(sweep)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    # validation logs proposal recall, so the report has its columns (300/1000/2000 at IoU 0.5/0.7)
    assert rows[0].startswith("| job | anchor | seed | status | final val/map | best val/map | final val/recall/300@0.5 |")
    assert rows[1].startswith("| 0 | k9 | 0 | completed | ") and rows[4].startswith("| 3 | k15 | 1 | completed | ")
    assert rows[5].startswith("| anchor | n | not completed | mean ± std | 95% interval | final val/map by seed |")
    assert rows[6].startswith("| k9 | 2 | 0 | ") and rows[7].startswith("| k15 | 2 | 0 | ") and len(rows) == 8
    assert "- `anchor=k9` vs `anchor=k15`: " in proc.stdout
    assert "`logger=none`" in proc.stdout and "`trainer.max_steps=2`" in proc.stdout  # fixed overrides
    for name in ("report.md", "report.csv", "report_configs.csv", "report.png"):
        assert (sweep / name).is_file()
    assert json.loads((sweep / "0" / "metrics.json").read_text())["selected_on"] == {"sets": ["shapes/val"], "is_test": False}
    print(proc.stdout)
