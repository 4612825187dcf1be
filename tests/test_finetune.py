"""Fine-tuning (init_from=<ckpt>): a new run from another run's detector, classes mapped by name.

The source is a short run on the built-in data (six shapes); the target is another dataset made
here in VOC layout with three of those classes in another order (the built-in generator's
renderer restricted to them), read through data=voc.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn import training
from fasterrcnn.build import UnsafeConfigError, model_config
from fasterrcnn.data.shapes import annotation_xml, render_image
from fasterrcnn.finetune import InitFromError, class_mapping, init_from_checkpoint
from fasterrcnn.lit import FasterRCNNModule
from fasterrcnn.training import train

from .conftest import SMALL_DATA, compose_config

REPO = Path(__file__).resolve().parents[1]
TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
FEW_STEPS = ["trainer.max_steps=2", "trainer.limit_val_batches=2", "trainer.max_epochs=1", "data.num_workers=0"]
SOURCE_STEPS = 4
SUBSET = ["triangle", "circle", "square"]  # labels 1, 2, 3 here; 3, 1, 2 in the source's six
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross"]
CLASS_KEYS = ("model.roi_head.cls_score.weight", "model.roi_head.cls_score.bias", "model.roi_head.bbox_pred.weight", "model.roi_head.bbox_pred.bias")


def write_shapes_voc(root: Path, classes: list[str], num_trainval: int = 8, num_test: int = 4) -> str:
    """A VOC-layout folder of built-in-style images holding only ``classes``."""
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(root / sub, exist_ok=True)
    ids = [f"{i:06d}" for i in range(num_trainval + num_test)]
    for image_id in ids:
        image, objects = render_image(np.random.default_rng([7, int(image_id)]), classes)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, image.shape[0], image.shape[1], objects))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in ids[:num_trainval]))
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in ids[num_trainval:]))
    return str(root)


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_dir) -> dict:
    """A short run on the built-in data: its metrics.json (checkpoints/last.ckpt is the source)."""
    out = tmp_path_factory.mktemp("source")
    cfg = compose_config([f"paths.output_dir={out}", f"paths.data_dir={data_dir}", "logger=none", *SMALL_DATA, *TINY_NET, *FEW_STEPS, f"trainer.max_steps={SOURCE_STEPS}"])
    metrics = train(cfg)
    assert metrics["status"] == "completed" and metrics["steps"] == SOURCE_STEPS
    return metrics


@pytest.fixture(scope="module")
def subset_root(tmp_path_factory) -> str:
    return write_shapes_voc(tmp_path_factory.mktemp("three") / "VOC3", SUBSET)


def subset_overrides(root: str, ckpt: str, classes: list[str] = SUBSET) -> list[str]:
    # the built-in data's image sizes (data=voc defaults to the paper's 600/1000)
    return ["data=voc", f"data.root={root}", f"data.classes=[{','.join(classes)}]", "data.min_size=256", "data.max_size=400", f"init_from={ckpt}"]


def source_state(ckpt: str) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_class_mapping_is_by_name_with_background_always():
    assert class_mapping(SHAPES, SUBSET) == {0: 0, 1: 3, 2: 1, 3: 2}
    assert class_mapping(SHAPES, ["dog", "star"]) == {0: 0, 2: 5}
    assert class_mapping(SHAPES, ["dog"]) == {0: 0}


def test_finetune_on_a_three_class_subset(make_cfg, source, subset_root, monkeypatch, caplog):
    """Trunk, RPN and RoI head layers as in the source; each class's rows from the source's row
    of that name; a new folder, a fresh optimiser and schedule, step 0; the log and metrics.json
    say what was loaded and mapped."""
    ckpt = source["checkpoints"]["last"]
    start: dict[str, torch.Tensor] = {}
    real = training.apply_init_from

    def spy(module, init_from, resume_path):
        record = real(module, init_from, resume_path)
        start.update({k: v.detach().clone() for k, v in module.state_dict().items()})
        return record

    monkeypatch.setattr(training, "apply_init_from", spy)
    cfg = make_cfg(TINY_NET + FEW_STEPS + subset_overrides(subset_root, ckpt), small_data=False)
    with caplog.at_level(logging.INFO, logger="fasterrcnn.finetune"):
        metrics = train(cfg)
    assert metrics["status"] == "completed" and metrics["steps"] == 2 and metrics["resumed_from"] is None

    src = source_state(ckpt)
    assert set(start) == set(src)
    for key, value in src.items():
        if key not in CLASS_KEYS:
            assert torch.equal(start[key], value), key  # trunk, RPN, RoI head layers: copied
    mapping = {0: 0, 1: 3, 2: 1, 3: 2}  # this run's label -> the source's (triangle, circle, square)
    for key in CLASS_KEYS:
        rows = 4 if "bbox_pred" in key else 1
        assert start[key].shape[0] == rows * 4 and src[key].shape[0] == rows * 7
        for dst, s in mapping.items():
            assert torch.equal(start[key][dst * rows : (dst + 1) * rows], src[key][s * rows : (s + 1) * rows]), (key, dst)

    record = metrics["init_from"]
    assert record["path"] == ckpt and record["loaded"] == len(src) - 4
    assert record["class_specific"] == list(CLASS_KEYS)
    assert record["mapped"] == {"triangle": [3, 1], "circle": [1, 2], "square": [2, 3]}
    assert record["reinitialised"] == [] and record["dropped"] == ["diamond", "star", "cross"]
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["init_from"] == record
    lines = [r.getMessage() for r in caplog.records if r.name == "fasterrcnn.finetune"]
    assert any(
        f"loaded {len(src) - 4} tensors whole" in m
        and "background, triangle 3->1, circle 1->2, square 2->3" in m
        and "re-initialised: none" in m
        and "dropped (not in this run): diamond, star, cross" in m
        for m in lines
    ), lines

    # A new run: its own folder, a fresh optimiser (2 AdamW steps, not 4 + 2) and schedule, step 0
    out = Path(cfg.paths.output_dir)
    assert out != Path(source["output_dir"])
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2  # counted from 0, not from the source's 4
    steps = {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()}
    assert steps == {2.0}
    assert last["lr_schedulers"][0]["last_epoch"] == 2
    source_ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert {float(s["step"]) for s in source_ckpt["optimizer_states"][0]["state"].values()} == {float(SOURCE_STEPS)}
    # the fine-tuned checkpoint is a 3-class detector that loads anywhere
    assert FasterRCNNModule.load(str(out / "checkpoints" / "last.ckpt")).class_names == SUBSET


def test_classes_not_in_the_checkpoint_keep_the_models_init(source):
    """A class the source lacks starts from the model's own initialisation; background and the
    shared class come from the source."""
    ckpt = source["checkpoints"]["last"]
    cfg = compose_config(["paths.output_dir=/unused", *TINY_NET, "data.classes=[hexagon,star]"])
    torch.manual_seed(1)
    module = FasterRCNNModule(model_config(cfg))
    fresh = {k: v.clone() for k, v in module.state_dict().items()}
    report = init_from_checkpoint(module, ckpt)
    state, src = module.state_dict(), source_state(ckpt)
    assert report.mapped == {"star": [5, 2]} and report.reinitialised == ["hexagon"] and report.dropped == ["circle", "square", "triangle", "diamond", "cross"]
    for key in CLASS_KEYS:
        r = 4 if "bbox_pred" in key else 1
        assert torch.equal(state[key][:r], src[key][:r])  # background
        assert torch.equal(state[key][r : 2 * r], fresh[key][r : 2 * r])  # hexagon: the model's init
        assert torch.equal(state[key][2 * r :], src[key][5 * r : 6 * r])  # star
    assert not torch.equal(state["model.rpn.conv.weight"], fresh["model.rpn.conv.weight"])


def test_another_architecture_is_refused_naming_the_tensor_shapes_and_config(make_cfg, source, subset_root):
    ckpt = source["checkpoints"]["last"]
    cfg = make_cfg(["backbone.widths=[8,16,16,48]", "backbone.head_features=64", *FEW_STEPS, *subset_overrides(subset_root, ckpt)], small_data=False)
    with pytest.raises(InitFromError) as err:
        train(cfg)
    message = str(err.value)
    assert "the architectures differ" in message
    assert "model.trunk.5.0.weight is (32, 16, 3, 3) in the checkpoint and (48, 16, 3, 3) here" in message
    assert "backbone.widths: [8, 16, 16, 32] in the checkpoint, [8, 16, 16, 48] here" in message
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["status"] == "failed" and "architectures differ" in on_disk["error"]


def test_an_untrusted_checkpoint_is_refused_before_anything_is_built(source, tmp_path):
    ckpt = torch.load(source["checkpoints"]["last"], map_location="cpu", weights_only=True)
    cfg = compose_config(["paths.output_dir=/unused", *TINY_NET])
    module = FasterRCNNModule(model_config(cfg))
    evil = dict(ckpt, hyper_parameters={**ckpt["hyper_parameters"], "model_cfg": {**ckpt["hyper_parameters"]["model_cfg"]}})
    evil["hyper_parameters"]["model_cfg"]["backbone"] = {"_target_": "pathlib.Path.write_text", "self": str(tmp_path / "pwned"), "data": "x"}
    torch.save(evil, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeConfigError, match=r"model_cfg\.backbone\._target_='pathlib\.Path\.write_text': refused"):
        init_from_checkpoint(module, str(tmp_path / "evil.ckpt"))
    assert not (tmp_path / "pwned").exists()
    torch.save({**ckpt, "extra": Path("x")}, tmp_path / "pickled.ckpt")  # a pickled object
    with pytest.raises(pickle.UnpicklingError):
        init_from_checkpoint(module, str(tmp_path / "pickled.ckpt"))
    torch.save({"state_dict": ckpt["state_dict"]}, tmp_path / "bare.ckpt")
    with pytest.raises(InitFromError, match="not a checkpoint of this project"):
        init_from_checkpoint(module, str(tmp_path / "bare.ckpt"))
    with pytest.raises(FileNotFoundError, match="init_from=.*nothere.ckpt"):
        init_from_checkpoint(module, str(tmp_path / "nothere.ckpt"))


def test_a_resumed_finetuning_run_keeps_going_and_keeps_its_record(make_cfg, source, subset_root, caplog):
    """Resume wins: the same command plus ckpt_path=last goes on from the run's own last.ckpt
    (init_from is not applied again) and metrics.json keeps the run's init_from."""
    ckpt = source["checkpoints"]["last"]
    base = TINY_NET + FEW_STEPS + subset_overrides(subset_root, ckpt)
    first = train(make_cfg(base, small_data=False))
    with caplog.at_level(logging.INFO, logger="fasterrcnn.finetune"):
        resumed = train(make_cfg(base + ["ckpt_path=last", "trainer.max_steps=3", "trainer.max_epochs=2"], small_data=False))
    assert resumed["status"] == "completed" and resumed["steps"] == 3
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["init_from"] == first["init_from"]
    assert any("not applied: resuming from" in r.getMessage() for r in caplog.records)


def test_finetune_from_the_command_line(tmp_path, source, subset_root):
    ckpt = source["checkpoints"]["last"]
    out = tmp_path / "run"
    args = [f"hydra.run.dir={out}", "logger=none", *TINY_NET, *FEW_STEPS, *subset_overrides(subset_root, ckpt)]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, str(REPO / "src" / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mapped by class name in roi_head.bbox_pred and roi_head.cls_score: background, triangle 3->1" in proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["init_from"]["mapped"]["square"] == [2, 3]
