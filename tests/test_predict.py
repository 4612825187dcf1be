"""Prediction on images and folders: outputs, detections.json, failures, thresholds, the CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fasterrcnn.boxes import boxes_to_voc
from fasterrcnn.data import DetectionDataset, collate
from fasterrcnn.data.voc import load_image
from fasterrcnn.lit import FasterRCNNModule
from fasterrcnn.predict import PredictError, predict
from fasterrcnn.training import train
from fasterrcnn.visualize import class_color, draw_detections

from .conftest import SMALL_DATA, compose_config

REPO = Path(__file__).resolve().parents[1]
TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
FEW_STEPS = ["trainer.max_steps=3", "trainer.limit_val_batches=1", "trainer.max_epochs=1", "data.num_workers=0"]
DETECTION_KEYS = {"class", "label", "score", "box"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """A tiny checkpoint trained for 3 steps on the built-in data: its path, classes and images."""
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config([f"paths.output_dir={out}", f"paths.data_dir={data_dir}", "logger=none", *SMALL_DATA, *TINY_NET, *FEW_STEPS])
    metrics = train(cfg)
    images = sorted(Path(data_dir).glob("shapes-*/JPEGImages/*.jpg"))
    return {"ckpt": metrics["checkpoints"]["last"], "classes": list(cfg.data.classes), "images": images}


@pytest.fixture
def folder(run, tmp_path):
    """2 good images (an RGB JPEG, a grey PNG), a corrupt JPEG and a text file."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(run["images"][0], folder / "a.jpg")
    Image.open(run["images"][1]).convert("L").save(folder / "b.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def predict_cfg(run, input, output, *overrides):
    return compose_config([f"ckpt_path={run['ckpt']}", f"input={input}", f"output={output}", *overrides], config_name="predict")


def test_folder_good_images_are_written_and_the_bad_one_reported(run, folder, tmp_path):
    out = tmp_path / "out"
    result = predict(predict_cfg(run, folder, out, "score_thresh=0", "device=cpu"))

    assert [r["file"] for r in result["images"]] == ["a.jpg", "b.png"]
    assert len(result["failures"]) == 1
    failure = result["failures"][0]
    assert failure["file"] == str(folder / "broken.jpg") and "broken.jpg: cannot decode the image" in failure["error"]
    assert sorted(os.listdir(out)) == ["a.jpg", "b.png", "detections.json"]  # notes.txt is not an image: skipped
    assert json.loads((out / "detections.json").read_text()) == result
    assert result["classes"] == run["classes"] and (result["min_size"], result["max_size"]) == (320, 400)  # the run's config.yaml

    for entry in result["images"]:
        drawn = load_image(str(out / entry["file"]))
        original = load_image(str(folder / entry["file"]))
        assert drawn.shape == original.shape == (3, entry["height"], entry["width"])
        assert entry["detections"], "score_thresh=0 keeps every box the model proposes"
        assert (drawn.int() - original.int()).abs().amax() > 100  # boxes were drawn
        for det in entry["detections"]:
            assert set(det) == DETECTION_KEYS
            assert det["class"] == run["classes"][det["label"] - 1]
            xmin, ymin, xmax, ymax = det["box"]  # VOC: 1-based, inclusive, inside the image
            assert 1 <= xmin <= xmax <= entry["width"] and 1 <= ymin <= ymax <= entry["height"]
        scores = [d["score"] for d in entry["detections"]]
        assert scores == sorted(scores, reverse=True)


def test_boxes_are_the_models_on_the_training_preprocessing_in_voc_coordinates(run, tmp_path):
    """The JSON boxes are what the model predicts on the image preprocessed as the DataModule
    does it (resize to the run's 320/400, the backbone's normalisation), plus VOC's 1-based shift."""
    image_path = run["images"][2]
    result = predict(predict_cfg(run, image_path, tmp_path / "out", "score_thresh=0.05"))
    module = FasterRCNNModule.load(run["ckpt"]).eval()
    backbone = module.hparams["model_cfg"]["backbone"]
    image = load_image(str(image_path))
    item = {
        "image": image,
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "difficult": torch.zeros(0, dtype=torch.bool),
        "image_id": "x",
    }
    batch = collate([DetectionDataset([item], 320, 400, backbone["mean"], backbone["std"])[0]])
    det = module.model.predict(batch.images, batch.image_sizes, batch.original_sizes, score_thresh=0.05)[0]

    got = result["images"][0]["detections"]
    assert len(got) == len(det["scores"]) > 0
    torch.testing.assert_close(torch.tensor([d["box"] for d in got]), boxes_to_voc(det["boxes"]), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.tensor([d["score"] for d in got]), det["scores"], atol=1e-4, rtol=0)
    assert [d["label"] for d in got] == det["labels"].tolist()


def test_score_thresh_filters(run, tmp_path):
    image_path = run["images"][3]
    everything = predict(predict_cfg(run, image_path, tmp_path / "all", "score_thresh=0"))["images"][0]["detections"]
    scores = sorted({d["score"] for d in everything})
    assert len(scores) >= 4
    thresh = (scores[len(scores) // 2] + scores[len(scores) // 2 + 1]) / 2  # between two distinct scores
    kept = predict(predict_cfg(run, image_path, tmp_path / "some", f"score_thresh={thresh}"))["images"][0]["detections"]
    assert len(kept) == sum(d["score"] > thresh for d in everything) < len(everything)
    assert all(d["score"] > thresh for d in kept)
    none = predict(predict_cfg(run, image_path, tmp_path / "none", "score_thresh=1"))
    assert none["images"][0]["detections"] == [] and none["failures"] == []
    assert (tmp_path / "none" / image_path.name).is_file()  # an image without detections is still written


def test_a_checkpoint_alone_predicts_with_its_training_preprocessing(run, tmp_path):
    # The checkpoint carries data.min_size/max_size and the backbone's mean/std: copied alone to
    # an empty folder (no config.yaml of its run anywhere near), it predicts as in training.
    lone = tmp_path / "lone" / "model.ckpt"
    lone.parent.mkdir()
    shutil.copy(run["ckpt"], lone)
    image = run["images"][0]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "src" / "predict.py"), f"ckpt_path={lone}", f"input={image}", f"output={out}", "device=cpu"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "detections.json").read_text())
    assert (result["min_size"], result["max_size"]) == (320, 400)  # the shapes data's, from the checkpoint
    assert [r["file"] for r in result["images"]] == [image.name] and result["failures"] == []
    # the same detections as with the run's config.yaml beside it
    beside = predict(compose_config([f"ckpt_path={run['ckpt']}", f"input={image}", f"output={tmp_path / 'out2'}", "score_thresh=0.0"], config_name="predict"))
    alone = predict(compose_config([f"ckpt_path={lone}", f"input={image}", f"output={tmp_path / 'out3'}", "score_thresh=0.0"], config_name="predict"))
    assert alone["images"][0]["detections"] == beside["images"][0]["detections"]
    cfg = compose_config([f"ckpt_path={lone}", f"input={image}", f"output={tmp_path / 'out4'}", "min_size=128", "max_size=200"], config_name="predict")
    assert (predict(cfg)["min_size"], predict(cfg)["max_size"]) == (128, 200)  # given sizes win


def test_an_old_checkpoint_without_preprocessing_needs_its_config_or_sizes(run, tmp_path):
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    del ckpt["hyper_parameters"]["model_cfg"]["preprocess"]
    lone = tmp_path / "old" / "model.ckpt"
    lone.parent.mkdir()
    torch.save(ckpt, lone)
    image = run["images"][0]
    cfg = compose_config([f"ckpt_path={lone}", f"input={image}", f"output={tmp_path / 'out'}"], config_name="predict")
    with pytest.raises(PredictError, match=r"model\.ckpt: an old checkpoint without its preprocessing.*min_size=600 max_size=1000"):
        predict(cfg)
    cfg = compose_config([f"ckpt_path={lone}", f"input={image}", f"output={tmp_path / 'out'}", "min_size=128", "max_size=200"], config_name="predict")
    result = predict(cfg)
    assert (result["min_size"], result["max_size"]) == (128, 200)
    assert [r["file"] for r in result["images"]] == [image.name] and result["failures"] == []


def test_errors_that_stop_everything_name_the_problem(run, folder, tmp_path):
    def cfg(*overrides):
        return compose_config([f"output={tmp_path / 'out'}", *overrides], config_name="predict")

    with pytest.raises(PredictError, match="ckpt_path is required"):
        predict(cfg(f"input={folder}"))
    with pytest.raises(PredictError, match=r"nosuch\.ckpt: no such file"):
        predict(cfg(f"input={folder}", f"ckpt_path={tmp_path / 'nosuch.ckpt'}", "min_size=256", "max_size=400"))
    (tmp_path / "fake.ckpt").write_text("not a checkpoint")
    with pytest.raises(PredictError, match=r"fake\.ckpt: cannot load it as a Faster R-CNN checkpoint"):
        predict(cfg(f"input={folder}", f"ckpt_path={tmp_path / 'fake.ckpt'}", "min_size=256", "max_size=400"))
    with pytest.raises(PredictError, match=r"input=.*nothere: no such file or folder"):
        predict(cfg(f"input={tmp_path / 'nothere'}", f"ckpt_path={run['ckpt']}"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(PredictError, match=r"empty: the folder holds no images"):
        predict(cfg(f"input={tmp_path / 'empty'}", f"ckpt_path={run['ckpt']}"))
    with pytest.raises(PredictError, match="would overwrite the originals"):
        predict(predict_cfg(run, folder / "a.jpg", folder))
    with pytest.raises(PredictError, match="score_thresh=1.5"):
        predict(predict_cfg(run, folder, tmp_path / "out", "score_thresh=1.5"))
    with pytest.raises(PredictError, match="min_size=-5"):
        predict(predict_cfg(run, folder, tmp_path / "out", "min_size=-5"))
    with pytest.raises(PredictError, match=r"draw\.font=.*nofont\.ttf: cannot load it"):
        predict(predict_cfg(run, folder, tmp_path / "out", f"draw.font={tmp_path / 'nofont.ttf'}"))
    if not torch.cuda.is_available():
        with pytest.raises(PredictError, match="CUDA is not available"):
            predict(predict_cfg(run, folder, tmp_path / "out", "device=cuda"))
    assert not (tmp_path / "out").exists()  # nothing written when nothing could start


def _cli(args, cwd):
    return subprocess.run([sys.executable, str(REPO / "src" / "predict.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def test_cli_exit_status_and_default_output_folder(run, folder, tmp_path):
    proc = _cli([f"ckpt_path={run['ckpt']}", f"input={folder}", "score_thresh=0.05"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 of 3 image(s) failed" in proc.stdout + proc.stderr and "broken.jpg: cannot decode" in proc.stdout + proc.stderr
    written = list((tmp_path / "outputs" / "predict").glob("*/*/detections.json"))
    assert len(written) == 1
    assert sorted(p.name for p in written[0].parent.iterdir() if p.is_file()) == ["a.jpg", "b.png", "detections.json", "predict.log"]
    assert [r["file"] for r in json.loads(written[0].read_text())["images"]] == ["a.jpg", "b.png"]

    proc = _cli([f"ckpt_path={run['ckpt']}", f"input={folder / 'a.jpg'}", f"output={tmp_path / 'one'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "one" / "detections.json").read_text())
    assert data["score_thresh"] == 0.7 and [r["file"] for r in data["images"]] == ["a.jpg"]


def test_draw_detections_colours_each_box_by_class():
    image = torch.full((3, 40, 60), 128, dtype=torch.uint8)
    none = draw_detections(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0), ["a", "b"])
    assert torch.equal(none, image) and none is not image

    boxes = torch.tensor([[5.0, 6.0, 25.0, 30.0], [30.0, 2.0, 58.0, 38.0]])
    out = draw_detections(image, boxes, torch.tensor([1, 2]), torch.tensor([0.9, 0.8]), ["a", "b"], line_width=1)
    assert torch.equal(image, torch.full((3, 40, 60), 128, dtype=torch.uint8))  # the input is left alone
    rgb = lambda hex_: [int(hex_[i : i + 2], 16) for i in (1, 3, 5)]
    # Continuous [5, 25) x [6, 30) covers pixels 5..24 x 6..29: the outline is on those edges.
    assert out[:, 29, 5].tolist() == rgb(class_color(1)) and out[:, 29, 24].tolist() == rgb(class_color(1))
    assert out[:, 37, 57].tolist() == rgb(class_color(2))
    assert out[:, 29, 25].tolist() == [128, 128, 128] and out[:, 20, 15].tolist() == [128, 128, 128]  # outside / inside
    with pytest.raises(ValueError, match="label 3 is outside 1..2"):
        draw_detections(image, boxes[:1], torch.tensor([3]), torch.tensor([0.5]), ["a", "b"])
