"""The notebook API (``from fasterrcnn import Detector``) on a real tiny checkpoint: inputs,
coordinates, classes, thresholds, drawing, errors, and that ``src/predict.py`` goes through it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from fasterrcnn import Detector
from fasterrcnn.api import Detections, PredictError
from fasterrcnn.data.transforms import rescale_factor
from fasterrcnn.data.voc import DatasetError, load_image
from fasterrcnn.predict import predict
from fasterrcnn.training import train

from .conftest import SMALL_DATA, compose_config

TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
FEW_STEPS = ["trainer.max_steps=3", "trainer.limit_val_batches=1", "trainer.max_epochs=1", "data.num_workers=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """A tiny checkpoint trained for 3 steps on the built-in data, copied alone to an empty
    folder (no config.yaml of its run near it), with its classes and images."""
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config([f"paths.output_dir={out}", f"paths.data_dir={data_dir}", "logger=none", *SMALL_DATA, *TINY_NET, *FEW_STEPS])
    metrics = train(cfg)
    lone = tmp_path_factory.mktemp("lone") / "model.ckpt"
    shutil.copy(metrics["checkpoints"]["last"], lone)
    images = sorted(Path(data_dir).glob("shapes-*/JPEGImages/*.jpg"))
    return {"ckpt": lone, "classes": list(cfg.data.classes), "images": images}


@pytest.fixture(scope="module")
def det(run):
    return Detector.from_checkpoint(run["ckpt"], device="cpu", score_thresh=0.05)


def same(a: Detections, b: Detections) -> bool:
    return (
        torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
        and a.class_names == b.class_names and a.image_size == b.image_size
    )  # fmt: skip


def test_a_checkpoint_alone_gives_a_detector_with_its_classes_and_preprocessing(run, det):
    assert det.classes == run["classes"]
    assert (det.preprocess.min_size, det.preprocess.max_size) == (320, 400)  # the shapes data's test size, carried by the checkpoint
    assert det.device == torch.device("cpu") and not det.model.training
    assert (det.score_thresh, det.nms_thresh) == (0.05, 0.3)  # given, and the checkpoint's
    smaller = Detector.from_checkpoint(run["ckpt"], device="cpu", min_size=128, max_size=200)
    assert (smaller.preprocess.min_size, smaller.preprocess.max_size) == (128, 200)
    assert smaller.preprocess.mean == det.preprocess.mean
    assert "6 classes" in repr(det) and "min_size=320" in repr(det)


def test_every_kind_of_input_gives_the_same_detections_as_predict_py(run, det, tmp_path):
    path = run["images"][0]
    by_path = det.predict(path)
    assert isinstance(by_path, Detections) and len(by_path) > 0
    with Image.open(path) as pil:
        by_pil = det.predict(pil)
    by_tensor = det.predict(load_image(str(path)))
    by_array = det.predict(np.asarray(Image.open(path).convert("RGB")))
    assert all(same(by_path, other) for other in (det.predict(str(path)), by_pil, by_tensor, by_array))
    assert by_path.image_size == (load_image(str(path)).shape[-2], load_image(str(path)).shape[-1])

    batch = det.predict([path, run["images"][1]])
    assert isinstance(batch, list) and len(batch) == 2 and same(batch[0], by_path) and same(batch[1], det.predict(run["images"][1]))

    # src/predict.py's detections.json for the same image and thresholds: one code path
    cfg = compose_config([f"ckpt_path={run['ckpt']}", f"input={path}", f"output={tmp_path / 'out'}", "score_thresh=0.05", "device=cpu"], config_name="predict")
    result = predict(cfg)
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert written["images"][0]["detections"] == result["images"][0]["detections"] == by_path.to_json()
    assert written["classes"] == det.classes and (written["min_size"], written["max_size"]) == (320, 400)
    assert written["nms_thresh"] == det.nms_thresh and written["score_thresh"] == det.score_thresh


def test_predict_py_detects_and_draws_through_the_detector(run, tmp_path, monkeypatch):
    calls = {"predict": 0, "save": 0}
    original_predict, original_save = Detector.predict, Detector.save

    def counted(name, fn):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return fn(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(Detector, "predict", counted("predict", original_predict))
    monkeypatch.setattr(Detector, "save", counted("save", original_save))
    folder = tmp_path / "in"
    folder.mkdir()
    for p in run["images"][:2]:
        shutil.copy(p, folder / p.name)
    result = predict(compose_config([f"ckpt_path={run['ckpt']}", f"input={folder}", f"output={tmp_path / 'out'}", "device=cpu"], config_name="predict"))
    assert len(result["images"]) == 2 and calls == {"predict": 2, "save": 2}


def test_a_pil_image_gets_the_exif_rotation_of_its_file(det, run, tmp_path):
    image = load_image(str(run["images"][0]))  # (3, H, W), H != W
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, exif=exif, quality=95)
    by_path = det.predict(path)
    assert by_path.image_size == (image.shape[-1], image.shape[-2])  # as displayed: width and height swapped
    with Image.open(path) as pil:
        assert same(det.predict(pil), by_path)


def test_boxes_are_in_the_original_images_coordinates(run):
    """A large image and its copy resized to the network's input size give the network the
    same pixels: the detections are the same, their boxes scaled by the ratio of the sizes."""
    det = Detector.from_checkpoint(run["ckpt"], device="cpu", score_thresh=0.0)
    # The RPN drops proposals under 16 px of the *original* image (the paper's rule), which
    # would keep different proposals for the two sizes; off, the two see the same ones.
    det.model.proposal_creator.min_size = 0
    image = load_image(str(run["images"][1]))
    large = image.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    h, w = large.shape[-2:]
    scale = rescale_factor(h, w, det.preprocess.min_size, det.preprocess.max_size)
    small = TF.resize(large, [round(h * scale), round(w * scale)], antialias=True)  # what prepare() makes of `large`
    a, b = det.predict(small), det.predict(large)
    assert len(a) == len(b) > 0 and torch.equal(a.labels, b.labels)
    torch.testing.assert_close(b.scores, a.scores)
    ratio = torch.tensor([w / small.shape[-1], h / small.shape[-2]] * 2)
    torch.testing.assert_close(b.boxes, a.boxes * ratio, atol=1e-3, rtol=1e-4)
    for result, (height, width) in ((a, small.shape[-2:]), (b, large.shape[-2:])):
        assert (result.boxes[:, :2] >= 0).all() and (result.boxes[:, 2] <= width).all() and (result.boxes[:, 3] <= height).all()
        assert (result.boxes[:, 2:] >= result.boxes[:, :2]).all()


def test_class_names_name_the_labels_and_score_thresh_filters(run, det):
    path = run["images"][3]
    everything = Detector.from_checkpoint(run["ckpt"], device="cpu", score_thresh=0.0).predict(path)
    assert everything.class_names == [run["classes"][k - 1] for k in everything.labels.tolist()]
    assert set(everything.labels.tolist()) <= set(range(1, len(run["classes"]) + 1))
    assert torch.equal(everything.scores, everything.scores.sort(descending=True).values)
    scores = everything.scores.unique()
    assert len(scores) >= 4
    thresh = float(scores[len(scores) // 2] + scores[len(scores) // 2 + 1]) / 2  # between two distinct scores
    kept = Detector.from_checkpoint(run["ckpt"], device="cpu", score_thresh=thresh).predict(path)
    assert len(kept) == int((everything.scores > thresh).sum()) < len(everything)
    assert (kept.scores > thresh).all()
    json_ = kept.to_json()
    assert [d["class"] for d in json_] == kept.class_names and [d["label"] for d in json_] == kept.labels.tolist()
    xmin, ymin, xmax, ymax = json_[0]["box"]  # VOC: 1-based, continuous x1 = xmin - 1
    assert [xmin - 1, ymin - 1, xmax, ymax] == pytest.approx(kept.boxes[0].tolist(), abs=0.006)
    det_thresh = det.score_thresh
    try:
        det.score_thresh = 1.0  # a plain attribute, read at each call
        assert len(det.predict(path)) == 0
    finally:
        det.score_thresh = det_thresh


def test_draw_returns_the_image_with_the_boxes_drawn(run, det, tmp_path):
    path = run["images"][0]
    image = load_image(str(path))
    before = image.clone()
    result = det.predict(image)
    drawn = det.draw(image, result, line_width=2)
    assert drawn.dtype == torch.uint8 and drawn.shape == image.shape and torch.equal(image, before)
    changed = (drawn.int() - image.int()).abs().amax(dim=0) > 0
    x1, y1, x2, y2 = result.boxes[0].floor().long().tolist()
    assert changed[y1, x1:x2].any() and changed.sum() > 0  # the top edge of the best box
    assert torch.equal(det.draw(path, line_width=2), drawn)  # result=None predicts on it
    nothing = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), [], result.image_size)
    assert torch.equal(det.draw(image, nothing), image)

    out = det.save(path, tmp_path / "drawn.png", result, line_width=2)
    assert torch.equal(load_image(str(out)), drawn)  # PNG: lossless
    with pytest.raises(ValueError, match="detections are of a"):
        det.draw(image[:, :100, :100], result)
    with pytest.raises(PredictError, match=r"unknown option\(s\) \['colour'\]"):
        det.draw(image, result, colour="red")


def test_errors_name_the_problem(run, det, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nosuch\.jpg: no such image file"):
        det.predict(tmp_path / "nosuch.jpg")
    with pytest.raises(FileNotFoundError, match="a folder, not an image"):
        det.predict(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DatasetError, match=r"broken\.jpg: cannot decode the image"):
        det.predict(tmp_path / "broken.jpg")
    with pytest.raises(TypeError, match="cannot predict on a int: give a file path, a PIL image"):
        det.predict(3)
    with pytest.raises(ValueError, match=r"tensor image must be \(3, H, W\) uint8.*torch.float32; a float image in 0..1"):
        det.predict(torch.rand(3, 50, 60))
    with pytest.raises(ValueError, match=r"tensor image must be \(3, H, W\) uint8 RGB, not \(50, 60, 3\)"):
        det.predict(torch.zeros(50, 60, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"numpy image must be \(H, W, 3\) uint8 RGB, not \(3, 50, 60\)"):
        det.predict(np.zeros((3, 50, 60), dtype=np.uint8))
    with pytest.raises(ValueError, match="more than 8 bits"):
        det.predict(Image.fromarray(np.zeros((20, 30), dtype=np.uint16)))

    with pytest.raises(PredictError, match=r"nosuch\.ckpt: no such file"):
        Detector.from_checkpoint(tmp_path / "nosuch.ckpt")
    (tmp_path / "fake.ckpt").write_text("not a checkpoint")
    with pytest.raises(PredictError, match=r"fake\.ckpt: cannot load it as a Faster R-CNN checkpoint"):
        Detector.from_checkpoint(tmp_path / "fake.ckpt")
    with pytest.raises(PredictError, match=r"score_thresh=1\.5: must be a number between 0 and 1"):
        Detector.from_checkpoint(run["ckpt"], score_thresh=1.5)
    with pytest.raises(PredictError, match="min_size=-5"):
        Detector.from_checkpoint(run["ckpt"], min_size=-5)
    if not torch.cuda.is_available():
        with pytest.raises(PredictError, match="CUDA is not available"):
            Detector.from_checkpoint(run["ckpt"], device="cuda")


def test_the_package_imports_the_api_only_when_asked():
    code = (
        "import sys, fasterrcnn\n"
        "assert 'lightning' not in sys.modules and 'fasterrcnn.api' not in sys.modules, sorted(sys.modules)\n"
        "from fasterrcnn import Detector, build\n"
        "print(Detector.__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "fasterrcnn.api"
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        import fasterrcnn

        fasterrcnn.Nothing  # noqa: B018
