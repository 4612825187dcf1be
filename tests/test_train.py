"""Training runs end to end: the Python entry point, the CLI, multirun, and the paper recipe."""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fasterrcnn.data import VOC_CLASSES, DatasetError
from fasterrcnn.training import train

from .conftest import SMALL_DATA
from .helpers import write_voc
from .wandb_offline import read_run

REPO = Path(__file__).resolve().parents[1]
TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
FEW_STEPS = ["trainer.max_steps=3", "trainer.limit_val_batches=2", "trainer.max_epochs=1", "data.num_workers=0"]


def test_train_writes_metrics_checkpoints_and_config(make_cfg, tmp_path):
    cfg = make_cfg(TINY_NET + FEW_STEPS)
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["status"] == "completed" and metrics["status"] == "completed"
    assert 0.0 <= on_disk["final"]["val/map"] <= 1.0 and on_disk["final"]["step"] == 3
    for key in ("val/loss", "val/rpn_cls", "val/rpn_loc", "val/roi_cls", "val/roi_loc"):
        assert key in on_disk["final"]
    assert on_disk["best"]["val/map"] == on_disk["final"]["val/map"]
    assert (out / "config.yaml").is_file()
    assert Path(on_disk["checkpoints"]["last"]).is_file()
    assert on_disk["warnings"] == [] and on_disk["monitor"] == "val/map"
    t = on_disk["time_s"]
    assert set(t) == {"startup", "training", "validation", "total"}
    assert t["startup"] > 0 and t["training"] > 0 and t["validation"] > 0  # imports before the fit; 3 steps; sanity check + 1 validation
    assert t["startup"] + t["training"] + t["validation"] <= t["total"] + 0.05


def test_failed_run_says_so_in_metrics_json(make_cfg):
    cfg = make_cfg(TINY_NET + FEW_STEPS + ["data.train_sets=[{split: nosuchsplit}]"])
    with pytest.raises(DatasetError, match="nosuchsplit"):
        train(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["status"] == "failed" and "nosuchsplit" in on_disk["error"]


def test_csv_logger_records_the_losses(make_cfg):
    cfg = make_cfg(TINY_NET + FEW_STEPS + ["logger=csv", "trainer.log_every_n_steps=1"])
    train(cfg)
    header = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/rpn_cls", "train/rpn_loc", "train/roi_cls", "train/roi_loc", "val/map"):
        assert key in header


def test_checkpoint_reloads_anywhere(make_cfg):
    import torch

    from fasterrcnn.lit import FasterRCNNModule

    cfg = make_cfg(TINY_NET + FEW_STEPS)
    metrics = train(cfg)
    module = FasterRCNNModule.load(metrics["checkpoints"]["last"]).eval()
    dets = module.model.predict(torch.zeros(1, 3, 64, 64), [(64, 64)], [(64, 64)])
    assert set(dets[0]) == {"boxes", "scores", "labels"}


def _run(args, cwd, timeout=600):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_multirun_gives_each_job_its_own_metrics_and_wandb_run(tmp_path, data_dir):
    args = ["-m", "anchor=k9,k15", f"paths.data_dir={data_dir}", "logger.wandb.offline=true", *SMALL_DATA, *TINY_NET, *FEW_STEPS]
    args += [f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = _run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(files) == 2
    for job, (f, anchor) in enumerate(zip(files, ("k9", "k15"))):
        data = json.loads(f.read_text())
        assert data["status"] == "completed" and f"anchor={anchor}" in data["overrides"]
        # one finished wandb run per job (never merged), named from its overrides, grouped by sweep
        run = read_run(str(f.parent))
        assert run.exit_code == 0 and run.group == "sweep"
        assert run.name.startswith(f"{job}:") and f"anchor={anchor}" in run.name
        assert "wandb sync" in proc.stdout
    # each job's startup counts from its own start, not the process's (which ran job 0 before)
    first, second = (json.loads(f.read_text())["time_s"] for f in files)
    assert second["startup"] < first["total"] and second["total"] < first["total"] + second["training"] + second["validation"] + second["startup"] + 0.1


def test_a_failing_multirun_job_is_recorded_and_the_sweep_goes_on(tmp_path, data_dir):
    args = ["-m", "optim.optimizer._target_=torch.optim.NoSuchOptimizer,torch.optim.AdamW", f"paths.data_dir={data_dir}", "logger=none"]
    args += [*SMALL_DATA, *TINY_NET, *FEW_STEPS, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = _run(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed, ok = (json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text()) for i in (0, 1))
    assert failed["status"] == "failed" and "torch.optim.NoSuchOptimizer" in failed["error"] and "refused" in failed["error"]
    assert ok["status"] == "completed"


def test_cli_single_run_default_output_folder(tmp_path, data_dir):
    # run as `bash -c "sleep 3; exec python src/train.py ..."` does: python in a process that began
    # 3 s before it; metrics.json's time_s counts from src/train.py's first line, not from there
    args = ["anchor=k9", "sampler=default", f"paths.data_dir={data_dir}", "logger=none", *SMALL_DATA, *TINY_NET, *FEW_STEPS]
    command = " ".join(shlex.quote(a) for a in [sys.executable, str(REPO / "src" / "train.py"), *args])
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    begun = time.time()
    proc = subprocess.run(["bash", "-c", f"sleep 3; exec {command}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    wall = time.time() - begun
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "outputs" / "runs").glob("*/*/metrics.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["status"] == "completed"
    assert json.loads(files[0].read_text())["time_s"]["total"] < wall - 2.5
    assert (files[0].parent / "checkpoints" / "last.ckpt").is_file()
    # Lightning's "`weights_only` was not set, defaulting to `False`" at every save (a save-side
    # flag, unrelated to torch.load's) is gone: fasterrcnn.checkpointing.save_full_checkpoint
    assert "weights_only" not in proc.stdout + proc.stderr


def test_voc07_vgg16_recipe_runs_on_a_local_voc_folder(tmp_path, make_cfg):
    """experiment=voc07_vgg16 on a VOC2007-layout folder made here: one training step and a
    validation pass at the paper's 600/1000 scale (ImageNet weights cannot be downloaded here)."""
    devkit = tmp_path / "VOCdevkit"
    objects = {f"{i:06d}": [(VOC_CLASSES[i % 20], (10 + i, 12, 200, 150), 0), ("person", (50, 60, 120, 230), i % 2)] for i in range(3)}
    root = write_voc(devkit, objects, VOC_CLASSES, size=(375, 500), split="trainval")
    write_voc(devkit, objects, VOC_CLASSES, size=(375, 500), split="test")
    cfg = make_cfg(
        ["experiment=voc07_vgg16", f"data.root={root}", "backbone.pretrained=false", "data.num_workers=0"]
        + ["trainer.max_steps=1", "trainer.limit_val_batches=1", "trainer.max_epochs=1"],
        small_data=False,
    )
    assert cfg.data.min_size == 600 and cfg.backbone._target_.endswith("vgg16")
    metrics = train(cfg)
    assert metrics["status"] == "completed" and metrics["steps"] == 1
    assert "val/map" in metrics["final"]
    # selection=none (the recipe validates on VOC2007 test): nothing picked, best = final
    assert metrics["monitor"] is None and metrics["selected_on"] is None and metrics["best"] == metrics["final"]


def test_missing_voc_says_where_it_looked_and_how_to_get_it(make_cfg, tmp_path):
    cfg = make_cfg(["data=voc2007", f"paths.data_dir={tmp_path / 'nodata'}"], small_data=False)
    with pytest.raises(DatasetError, match=r"VOC2007/ImageSets/Main/trainval\.txt.*download_voc\.py --year 2007"):
        train(cfg)


def test_end_to_end_the_loss_falls_and_map_rises(make_cfg):
    """A small detector fitted to 8 built-in images: the training loss falls and the mAP on those
    images rises from chance, through the real entry point (Lightning, the DataModule, metrics)."""
    import csv

    cfg = make_cfg(
        [
            "data.builtin.num_train=8",
            "data.builtin.num_val=4",
            "data.builtin.num_test=4",
            "data.val_sets=[{split: train}]",
            "augment=paper",  # fitting 8 images: no augmentation
            "augment.hflip=0",
            "data.min_size=256",
            "backbone.widths=[16,32,64,64]",
            "backbone.head_features=128",
            "optim=adamw",
            "optim.lr=2e-3",
            "optim.lr_decay_epochs=[]",
            "trainer.max_epochs=20",
            "logger=csv",
            "trainer.log_every_n_steps=1",
        ],
        small_data=False,
    )
    metrics = train(cfg)
    rows = list(csv.DictReader((Path(cfg.paths.output_dir) / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    maps = [float(r["val/map"]) for r in rows if r.get("val/map")]
    assert len(losses) == 160 and len(maps) == 20
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20
    assert maps[0] < 0.1 and max(maps) > 0.25 and metrics["best"]["val/map"] == max(maps)
