"""Faults: a non-finite loss (stop or skip), a diverging but finite loss, a killed run resumed exactly, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fasterrcnn.lit import FasterRCNNModule, NonFiniteLossError
from fasterrcnn.training import resolve_ckpt_path, train

from .conftest import SMALL_DATA, compose_config

REPO = Path(__file__).resolve().parents[1]
TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
# NMS over the default 2000 proposals was half of a step of this tiny net.
FEW_PROPOSALS = [f"sampler.proposal.n_{s}_{w}_nms={n}" for s in ("train", "test") for w, n in (("pre", 300), ("post", 100))]
# 2 epochs x 8 steps on small images; last.ckpt every 3 steps; no logger.
RUN = [
    *TINY_NET,
    *SMALL_DATA,
    "data.min_size=128",
    "data.max_size=200",
    *FEW_PROPOSALS,
    "logger=none",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=2",
    "fault.checkpoint_every_n_steps=3",
    "trainer.enable_model_summary=false",
]
EPOCH, STEPS = 8, 16
# The kill-and-resume runs: the paper's flip (torch's global generator, seeded per batch), and
# strong augmentation with mosaics and multi-scale sizes (every draw, the mosaic's partners too,
# from its (seed, epoch, index) stream).
AUGMENT = {"paper": [], "strong": ["augment=strong", "augment.mosaic=0.5", "data.min_size=[112,128,144]"]}


def _cfg(tmp_path: Path, data_dir: str, name: str, extra: list[str] = ()):
    return compose_config([f"paths.output_dir={tmp_path / name}", f"paths.data_dir={data_dir}", "trainer.enable_progress_bar=false", *RUN, *extra])


def _nan_losses_at(monkeypatch, steps: set[int]) -> list[list[str]]:
    """Make the training loss NaN at the given global steps; returns the image ids of those steps."""
    seen: list[list[str]] = []
    losses = FasterRCNNModule._losses

    def patched(self, batch):
        out = losses(self, batch)
        if self.training and self.global_step in steps:
            seen.append(list(batch.image_ids))
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(FasterRCNNModule, "_losses", patched)
    return seen


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_nonfinite_loss_stops_with_the_step_and_images_before_the_weights_change(tmp_path, data_dir, monkeypatch):
    seen = _nan_losses_at(monkeypatch, {5})
    cfg = _cfg(tmp_path, data_dir, "stop", ["fault.checkpoint_every_n_steps=1"])
    with pytest.raises(NonFiniteLossError, match=r"global step 5 \(epoch 0, batch 5\)") as err:
        train(cfg)
    assert seen and all(image_id in str(err.value) for image_id in seen[0])
    out = Path(cfg.paths.output_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "global step 5" in metrics["error"] and seen[0][0] in metrics["error"]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5
    assert all(torch.isfinite(w).all() for w in ckpt["state_dict"].values())


def test_nonfinite_loss_skip_goes_on_and_counts(tmp_path, data_dir, monkeypatch):
    _nan_losses_at(monkeypatch, {2, 7})
    cfg = _cfg(tmp_path, data_dir, "skip", ["fault.on_nonfinite_loss=skip", "trainer.max_epochs=1"])
    with pytest.warns(UserWarning, match="skipping the step at global step 2"):
        metrics = train(cfg)
    assert metrics["status"] == "completed" and metrics["skipped_steps"] == 2 and metrics["steps"] == EPOCH
    ckpt = torch.load(metrics["checkpoints"]["last"], map_location="cpu", weights_only=True)
    assert ckpt["skipped_steps"] == 2
    assert all(torch.isfinite(w).all() for w in ckpt["state_dict"].values())


def test_a_diverging_finite_loss_warns_once_and_metrics_json_says_so(tmp_path, data_dir, monkeypatch):
    """From global step 5 on the loss reads 1e6 x its value (its gradients unchanged): finite, so
    the run completes, but it says so once, in a warning and in metrics.json's `warnings`."""
    losses = FasterRCNNModule._losses

    def patched(self, batch):
        out = losses(self, batch)
        if self.training and self.global_step >= 5:
            out = {**out, "loss": out["loss"] + out["loss"].detach() * (1e6 - 1)}
        return out

    monkeypatch.setattr(FasterRCNNModule, "_losses", patched)
    cfg = _cfg(tmp_path, data_dir, "diverging", ["trainer.max_epochs=1", "trainer.log_every_n_steps=1", "callbacks.divergence.window=3"])
    with pytest.warns(UserWarning, match=r"the training loss is diverging: \S+ at global step 6 \(epoch 0\), above 10000") as record:
        metrics = train(cfg)
    assert sum("diverging" in str(w.message) for w in record) == 1
    assert metrics["status"] == "completed" and metrics["steps"] == EPOCH
    (warning,) = metrics["warnings"]
    assert (warning["kind"], warning["step"]) == ("diverging_loss", 6) and warning["loss"] > 1e5
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["warnings"] == metrics["warnings"]


def test_a_loss_far_above_its_early_median_warns():
    """The relative rule alone (no absolute bound): 10 x the median of the first `window` losses."""
    from types import SimpleNamespace

    from fasterrcnn.callbacks import DivergenceWarning

    watch = DivergenceWarning(every_n_steps=2, window=3, factor=10.0, max_loss=None)
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=0, global_step=0)
    with pytest.warns(UserWarning, match="diverging: 400 at global step 12"):
        for step, loss in enumerate([4.0, 9.0, 3.0, 2.0, 1.0, 5.0, 1.0, 25.0, 500.0, 31.0, 1.0, 400.0], start=1):
            trainer.global_step = step
            watch.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step - 1)
    # looked at: steps 2, 4, 6 (baseline 9, 2, 5: median 5), 8 (25: not above 50), 10 (31), 12 (400): warned
    assert watch.early == [9.0, 2.0, 5.0] and [(w["step"], w["loss"]) for w in watch.warnings] == [(12, 400.0)]
    assert "above 10 x 5, the median of the first 3" in watch.warnings[0]["message"]
    again = DivergenceWarning(every_n_steps=2, window=3, max_loss=None)
    again.load_state_dict(watch.state_dict())
    assert again.early == watch.early and again.warnings == watch.warnings


def test_unknown_nonfinite_policy_is_refused(tmp_path, data_dir):
    with pytest.raises(ValueError, match="fault.on_nonfinite_loss must be one of"):
        train(_cfg(tmp_path, data_dir, "bad", ["fault.on_nonfinite_loss=ignore"]))


def test_ckpt_path_last_without_a_run_folder_says_how(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match=r"checkpoints/last\.ckpt not found; .*hydra\.run\.dir="):
        train(_cfg(tmp_path, data_dir, "fresh", ["ckpt_path=last"]))
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=nosuch\.ckpt: nosuch\.ckpt not found"):
        resolve_ckpt_path("nosuch.ckpt", str(tmp_path))


def test_ckpt_path_auto_resumes_when_there_is_a_last_checkpoint(tmp_path):
    assert resolve_ckpt_path("auto", str(tmp_path)) is None  # a first start
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("auto", str(tmp_path)) == str(tmp_path / "checkpoints" / "last.ckpt")


# ---------------------------------------------------------------------- kill and resume
@pytest.fixture(scope="module")
def references(tmp_path_factory, data_dir):
    """``references(augment)``: the same run, never interrupted (trained once per module)."""
    done: dict[str, dict] = {}

    def reference(augment: str) -> dict:
        if augment not in done:
            tmp = tmp_path_factory.mktemp(f"uninterrupted-{augment}")
            metrics = train(_cfg(tmp, data_dir, "run", AUGMENT[augment]))
            assert metrics["status"] == "completed" and metrics["steps"] == STEPS
            done[augment] = metrics
        return done[augment]

    return reference


@pytest.fixture
def uninterrupted(references):
    return references("paper")


def _cli(run_dir: Path, data_dir: str, extra: list[str] = (), progress: bool = False) -> subprocess.Popen:
    args = [f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", f"trainer.enable_progress_bar={str(progress).lower()}", *RUN, *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "src" / "train.py"), *args], cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _resume_and_compare(run_dir: Path, data_dir: str, reference: dict, extra: list[str] = ()) -> dict:
    """The documented command: the same overrides + ckpt_path=last hydra.run.dir=<the run's folder>."""
    proc = _cli(run_dir, data_dir, [*extra, "ckpt_path=last"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["status"] == "completed" and resumed["steps"] == STEPS
    assert resumed["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    # Exact on CPU: same data order, flips, samples, optimiser and schedule as the reference.
    for key in ("val/map", "val/loss", "val/rpn_cls", "val/roi_loc"):
        assert resumed["final"][key] == pytest.approx(reference["final"][key], rel=0, abs=1e-6), key
    assert resumed["best"]["val/map"] == pytest.approx(reference["best"]["val/map"], rel=0, abs=1e-6)
    a, b = _weights(resumed["checkpoints"]["last"]), _weights(reference["checkpoints"]["last"])
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    return resumed


@pytest.mark.parametrize("augment", list(AUGMENT))
def test_a_killed_run_resumes_exactly(tmp_path, data_dir, references, augment):
    """SIGKILL after a mid-epoch checkpoint of the second epoch; ckpt_path=last goes on."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _cli(run_dir, data_dir, AUGMENT[augment])
    last = run_dir / "checkpoints" / "last.ckpt"
    step = 0
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if last.is_file():
                step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
                if step > EPOCH:  # in the second epoch
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.05)
    finally:
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-run (last step seen {step})\n{out[-3000:]}"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert EPOCH < ckpt["global_step"] < STEPS and ckpt["global_step"] % 3 == 0
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "running"  # killed: nobody could say
    _resume_and_compare(run_dir, data_dir, references(augment), AUGMENT[augment])


def test_ctrl_c_saves_a_checkpoint_at_the_step_and_the_run_resumes(tmp_path, data_dir, uninterrupted):
    """SIGINT a few steps into the first epoch, with no periodic checkpoint: last.ckpt is the one
    written at the interrupt; metrics.json says interrupted; the run resumes exactly."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _cli(run_dir, data_dir, ["fault.checkpoint_every_n_steps=0"], progress=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for chunk in iter(lambda: proc.stdout.read(64), ""):
            lines.append(chunk)
            if re.search(r"Epoch 0:[^\n\r]*\b[2-6]/8\b", "".join(lines[-4:])):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(300), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    out = "".join(lines)
    assert proc.returncode != 0, out[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["error"] is None
    last = run_dir / "checkpoints" / "last.ckpt"
    assert metrics["checkpoints"]["last"] == str(last)
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert 2 <= ckpt["global_step"] < EPOCH, out[-3000:]  # mid-epoch 0: only the interrupt can have written it
    module = FasterRCNNModule.load(str(last))
    assert all(torch.isfinite(p).all() for p in module.parameters())
    _resume_and_compare(run_dir, data_dir, uninterrupted)
