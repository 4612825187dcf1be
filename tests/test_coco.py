"""COCO-format data (data=coco, data=shapes_coco): the box conversion, the COCO copy of the built-in
data read back like its VOC copy, every bad input reported with its file and ids, training and
eval through the real entry points, and eval's COCO results file scored by pycocotools' COCOeval
against the dataset's own annotation file: the same mAP as ours."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn.boxes import boxes_to_coco, boxes_to_voc, coco_to_boxes, voc_to_boxes
from fasterrcnn.build import build_datamodule
from fasterrcnn.data import COCODetection, DatasetError, VOCDataModule, VOCDetection
from fasterrcnn.data import coco as coco_module
from fasterrcnn.data.check import bad_samples, report_dataset
from fasterrcnn.data.shapes import SHAPE_CLASSES, coco_path, ensure_dataset
from fasterrcnn.evaluate import evaluate
from fasterrcnn.evaluation.metrics import DetectionMetrics
from fasterrcnn.evaluation.results import write_coco_files
from fasterrcnn.training import train

from .conftest import SMALL_DATA, compose_config

TINY_NET = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
SIZE = (40, 50)  # (height, width) of the test images
# COCOeval's summary lines, in the order of its stats, as our keys
STATS = {"map": 0, "map_50": 1, "map_75": 2, "map_small": 3, "map_medium": 4, "map_large": 5, "mar_100": 8}


def _small_params() -> dict:
    """SMALL_DATA's generator parameters."""
    params = {o.split("=")[0].removeprefix("data.builtin."): int(o.split("=")[1]) for o in SMALL_DATA if o.startswith("data.builtin.")}
    return params


@pytest.fixture(scope="module")
def shapes_root(data_dir) -> str:
    return ensure_dataset(data_dir, progress=False, **_small_params())


def cocoeval(gt_path: str, results_path: str, image_ids=None, thresholds: str = "torchmetrics") -> np.ndarray:
    """pycocotools' COCOeval stats of a results file against a ground-truth file, with the IoU and
    recall thresholds torchmetrics gives it ("torchmetrics": ``torch.linspace``, float32, so
    0.55 is 0.550000011920929) or with its own float64 ones ("coco")."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        dt = gt.loadRes(results_path)
        e = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            e.params.imgIds = list(image_ids)
        if thresholds == "torchmetrics":
            e.params.iouThrs = np.array(torch.linspace(0.5, 0.95, 10).tolist())
            e.params.recThrs = np.array(torch.linspace(0.0, 1.0, 101).tolist())
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def largest_difference(ours: dict, stats: np.ndarray, prefix: str = "") -> float:
    return max(abs(ours[f"{prefix}coco/{key}"] - stats[i]) for key, i in STATS.items() if stats[i] != -1)


def assert_same_as_cocoeval(ours: dict, stats: np.ndarray, prefix: str = "") -> None:
    """Our COCO-style numbers are COCOeval's (with torchmetrics' thresholds), stored as float32 by
    torchmetrics (``torch.tensor([stats[0]], dtype=torch.float32)``): equal after that rounding,
    difference 0."""
    for key, i in STATS.items():
        expected = math.nan if stats[i] == -1 else float(np.float32(stats[i]))
        got = ours[f"{prefix}coco/{key}"]
        assert (math.isnan(got) and math.isnan(expected)) or got == expected, (key, got, stats[i])


# ---------------------------------------------------------------------- boxes
def test_coco_boxes_round_trip_and_meet_voc():
    coco = torch.tensor([[0.0, 0.0, 10.0, 20.0], [12.5, 3.25, 0.5, 7.0]])
    boxes = coco_to_boxes(coco)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 10.0, 20.0], [12.5, 3.25, 13.0, 10.25]]))
    torch.testing.assert_close(boxes_to_coco(boxes), coco)
    # the VOC box over pixels 1..10 x 1..20 (1-based, inclusive) is COCO's [0, 0, 10, 20]: both
    # conversions meet in the same continuous box, without any pixel offset on COCO's side
    voc = torch.tensor([[1.0, 1.0, 10.0, 20.0]])
    torch.testing.assert_close(boxes_to_coco(voc_to_boxes(voc)), coco[:1])
    torch.testing.assert_close(boxes_to_voc(coco_to_boxes(coco[:1])), voc)


# ---------------------------------------------------------------------- the built-in data, both layouts
def test_coco_copy_of_the_builtin_data_reads_like_the_voc_copy(shapes_root):
    for split in ("train", "val", "test"):
        voc = VOCDetection(shapes_root, split, SHAPE_CLASSES)
        coco = COCODetection(os.path.join(shapes_root, "JPEGImages"), coco_path(shapes_root, split))
        assert coco.classes == SHAPE_CLASSES and coco.category_ids == [1, 2, 3, 4, 5, 6]
        assert coco.ids == [str(int(i)) for i in voc.ids]  # 000012.jpg is image 12
        assert coco.check() == []
        for a, b in zip(voc, coco):
            assert torch.equal(a["image"], b["image"])
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"]) and torch.equal(a["difficult"], b["difficult"])
    # on disk: COCO's bbox is the VOC box less one pixel at the corner, one pixel more in size
    data = json.loads(Path(coco_path(shapes_root, "val")).read_text())
    first = data["annotations"][0]
    xml = Path(shapes_root, "Annotations", data["images"][0]["file_name"].replace(".jpg", ".xml")).read_text()
    xmin, ymin, xmax, ymax = (int(xml.split(f"<{k}>")[1].split("<")[0]) for k in ("xmin", "ymin", "xmax", "ymax"))
    assert first["image_id"] == data["images"][0]["id"] and first["bbox"] == [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]
    assert [a["id"] for a in data["annotations"]] == list(range(1, len(data["annotations"]) + 1))  # from 1: COCOeval's 0 is "unmatched"
    assert {a["iscrowd"] for a in data["annotations"]} <= {0, 1} and data["categories"][0] == {"id": 1, "name": "circle", "supercategory": "shape"}


def test_folder_generated_before_the_coco_copy_gets_it_and_keeps_its_voc_files(tmp_path):
    root = ensure_dataset(str(tmp_path), num_train=3, num_val=2, num_test=1, progress=False)
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(root).rglob("*") if p.is_file() and "annotations" not in p.parts}
    written = Path(coco_path(root, "val")).read_bytes()
    shutil.rmtree(os.path.join(root, "annotations"))  # as in a folder from before
    assert ensure_dataset(str(tmp_path), num_train=3, num_val=2, num_test=1, progress=False) == root
    assert Path(coco_path(root, "val")).read_bytes() == written
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(root).rglob("*") if p.is_file() and "annotations" not in p.parts}
    assert after == digests  # every VOC file byte-identical


# ---------------------------------------------------------------------- bad inputs
def _image(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(folder / name)


def _ann(ann_id: int, image_id: int, bbox, category_id: int = 1, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd, "area": 1.0}


CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 1, "name": "cat"}]  # out of id order: classes are (cat, dog)


def _bad_coco(tmp_path: Path) -> tuple[Path, dict[str, set[str]]]:
    """A COCO folder (images/, train.json) with one image per problem kind; returns the folder and
    image id -> the kinds expected."""
    h, w = SIZE
    names = {1: "good", 2: "noimage", 3: "unknown", 4: "dup_a", 5: "degenerate", 6: "outside", 7: "clipped", 8: "badbox", 9: "empty", 10: "mismatch", 11: "crowd", 12: "nosize"}
    images = []
    for i, name in names.items():
        if name != "noimage":
            _image(tmp_path / "images", f"{name}.jpg")
        images.append({"id": i, "file_name": f"{name}.jpg", "width": 500 if name == "mismatch" else w, "height": 375 if name == "mismatch" else h})
    images[-1] = {"id": 12, "file_name": "nosize.jpg"}
    _image(tmp_path / "images", "dup_b.jpg")
    images.append({"id": 4, "file_name": "dup_b.jpg", "width": w, "height": h})  # image id 4 twice
    good = [10, 10, 20, 10]
    annotations = [
        _ann(1, 1, good),
        _ann(2, 2, good),
        _ann(3, 3, good, category_id=99),
        _ann(4, 4, good),
        _ann(5, 5, [10, 10, 0, 5]),
        _ann(6, 6, [60, 10, 5, 5]),
        _ann(7, 7, [-2, 10, 20, 10], category_id=7),
        _ann(8, 8, ["a", 1, 2, 3]),
        _ann(9, 8, [1, 2, 3]),
        _ann(10, 10, good),
        _ann(11, 11, good, iscrowd=1),
        _ann(12, 11, [30, 20, 10, 10], category_id=7),
        _ann(13, 12, good),
        _ann(14, 77, good),  # an image the file does not list
    ]
    (tmp_path / "train.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    expected = {
        "1": set(), "2": {"missing_image"}, "3": {"unknown_class"}, "4": {"duplicate_image_id"}, "5": {"degenerate_box"},
        "6": {"box_outside"}, "7": {"box_clipped"}, "8": {"bad_box"}, "9": {"no_objects"}, "10": {"size_mismatch"},
        "11": set(), "12": {"missing_size"},
    }  # fmt: skip
    return tmp_path, expected


def _coco(root: Path, name: str = "train.json", **kwargs) -> COCODetection:
    return COCODetection(str(root / "images"), str(root / name), **kwargs)


def test_every_problem_is_reported_with_its_file_and_ids(tmp_path):
    root, expected = _bad_coco(tmp_path)
    dataset = _coco(root)
    assert dataset.classes == ("cat", "dog") and dataset.category_ids == [1, 7]
    problems = dataset.check()
    found: dict[str, set[str]] = {i: set() for i in expected}
    for p in problems:
        if p.image_id is None:
            assert p.kind == "orphan_annotation" and "annotation 14: image_id 77" in p.message and p.file == str(root / "train.json")
            continue
        found[p.image_id].add(p.kind)
        assert p.file == str(root / ("images/noimage.jpg" if p.kind == "missing_image" else "train.json"))
        assert f"image {p.image_id}" in str(p) or p.kind == "missing_image"
    assert found == expected
    messages = {p.kind: str(p) for p in problems}
    assert "annotation 3 of image 3 ('unknown.jpg'): category_id 99 is not one of the file's categories (1 cat, 7 dog)" in messages["unknown_class"]
    assert "image 4 ('dup_b.jpg'): its id is listed 2 times in images ('dup_a.jpg', 'dup_b.jpg')" in messages["duplicate_image_id"]
    assert "annotation 5 of image 5" in messages["degenerate_box"] and "annotation 9 of image 8 ('badbox.jpg'): bbox [1, 2, 3] is not 4 finite numbers" in messages["bad_box"]
    assert sum(p.kind == "bad_box" for p in problems) == 2  # both of image 8's
    assert set(bad_samples(problems)) == {"2", "3", "4", "5", "6", "8", "10"}
    # reading a bad sample raises naming the file and the ids; a good one gives VOCDetection's item
    with pytest.raises(DatasetError, match=r"train\.json: annotation 5 of image 5 \('degenerate\.jpg'\)"):
        dataset[dataset.ids.index("5")]
    crowd = dataset[dataset.ids.index("11")]
    assert crowd["image_id"] == "11" and crowd["labels"].tolist() == [1, 2] and crowd["difficult"].tolist() == [True, False]
    torch.testing.assert_close(crowd["boxes"], torch.tensor([[10.0, 10.0, 30.0, 20.0], [30.0, 20.0, 40.0, 30.0]]))
    # data.max_objects: an image with more annotations is a bad sample
    capped = _coco(root, max_objects=1).check_sample("11")
    assert [p.kind for p in capped] == ["too_many_objects"] and "image 11 ('crowd.jpg') has 2 annotations, more than data.max_objects=1" in str(capped[0])


def _datamodule(root: Path, on_bad_sample: str, classes=None) -> VOCDataModule:
    spec = {"format": "coco", "images": "images", "annotations": "train.json"}
    return VOCDataModule("test", classes, root=str(root), train_sets=[spec], val_sets=[spec], min_size=40, max_size=80, num_workers=0, on_bad_sample=on_bad_sample)


def test_error_policy_stops_and_skip_policy_counts_the_bad_samples(tmp_path, caplog):
    root, _ = _bad_coco(tmp_path)
    with pytest.raises(DatasetError, match=r"train\.json: 7 of 12 train samples are bad(.|\n)*noimage\.jpg: image not found"):
        _datamodule(root, "error").setup("fit")
    dm = _datamodule(root, "skip")
    with caplog.at_level(logging.WARNING, logger="fasterrcnn.data.datamodule"):
        dm.setup("fit")
    assert "skipping 7 of 12 train samples" in caplog.text and "boxes reach outside their image and are clipped" in caplog.text
    kinds = {"missing_image", "unknown_class", "duplicate_image_id", "degenerate_box", "box_outside", "bad_box", "size_mismatch"}
    assert dm.skipped["train"] == 7 and dm.skipped_by_kind["train"] == {k: 1 for k in kinds}
    assert dm.datasets["train"].voc.ids == ["1", "7", "9", "11", "12"] and dm.classes == ("cat", "dog")
    clipped = dm.datasets["train"][1]
    torch.testing.assert_close(clipped["original_boxes"], torch.tensor([[0.0, 10.0, 18.0, 20.0]]))  # clipped to the image
    assert clipped["labels"].tolist() == [2]
    # a subset of the categories: the others' annotations are left out, their images kept
    dogs = _datamodule(root, "skip", classes=["dog"])
    dogs.setup("fit")
    items = {item["image_id"]: item for item in (dogs.datasets["train"][i] for i in range(len(dogs.datasets["train"])))}
    assert items["11"]["labels"].tolist() == [1] and items["1"]["labels"].tolist() == []


@pytest.mark.parametrize(
    "content, why",
    [
        (b"\x80 this is not JSON", "not JSON"),
        (b"[1, 2, 3]", "not a COCO annotation file: the top level is not an object"),
        (json.dumps({"images": [], "categories": "cat"}).encode(), "no 'categories' list"),
        (json.dumps({"images": [{"id": 1, "file_name": "../../etc/passwd"}], "categories": CATEGORIES}).encode(), "has a '..' component"),
        (json.dumps({"images": [{"id": 1, "file_name": "/etc/passwd"}], "categories": CATEGORIES}).encode(), "is an absolute path"),
        (json.dumps({"images": [{"id": "1", "file_name": "a.jpg"}], "categories": CATEGORIES}).encode(), r"images\[0\] has no integer 'id'"),
        (json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1, "category_id": [1]}], "categories": CATEGORIES}).encode(), "no integer 'category_id'"),
        (json.dumps({"images": [], "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}]}).encode(), "two categories have the name 'cat'"),
    ],
)
def test_a_file_that_is_not_coco_is_refused_under_both_policies(tmp_path, content, why):
    (tmp_path / "train.json").write_bytes(content)
    for policy in ("error", "skip"):
        with pytest.raises(DatasetError, match=rf"train\.json: .*{why}") as err:
            _datamodule(tmp_path, policy, classes=["cat"]).setup("fit")
        assert err.value.kind == "bad_json"


def test_missing_and_oversized_files_are_refused_unread(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"nothere\.json: annotation not found"):
        COCODetection(str(tmp_path), str(tmp_path / "nothere.json"))
    root, _ = _bad_coco(tmp_path)
    shutil.copy(root / "train.json", root / "big.json")
    monkeypatch.setattr(coco_module, "MAX_JSON_BYTES", 64)
    with pytest.raises(DatasetError, match=r"big\.json: larger than 0 MiB .*not read"):
        _coco(root, "big.json")
    # a chosen class the file does not have names the file and its categories
    monkeypatch.undo()
    with pytest.raises(DatasetError, match=r"train\.json: data.classes names 'zebra', not a category of this file \(its categories: cat, dog\)"):
        _coco(root, classes=["cat", "zebra"])


def test_check_dataset_reports_a_coco_set(tmp_path, capsys):
    root, expected = _bad_coco(tmp_path)
    (root / "val.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "good.jpg", "width": SIZE[1], "height": SIZE[0]}],
                                               "annotations": [_ann(1, 1, [10, 10, 20, 10])], "categories": CATEGORIES}))  # fmt: skip
    sets = {stage: f"[{{format: coco, images: images, annotations: {name}}}]" for stage, name in (("train", "train.json"), ("val", "val.json"), ("test", "val.json"))}
    overrides = ["data=coco", f"data.root={root}", *(f"data.{stage}_sets={value}" for stage, value in sets.items()), f"paths.output_dir={tmp_path / 'out'}"]
    cfg = compose_config(overrides)
    assert list(cfg.data.classes) == ["cat", "dog"]  # ${coco_categories:}: the file's categories by id
    out = tmp_path / "report.json"
    assert report_dataset(build_datamodule(cfg), json_path=out) == 1
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    train, val = report["splits"]
    assert train["split"] == str(root / "train.json") and train["stages"] == ["train"] and train["samples"] == 12
    assert train["counts"] == {"missing_image": 1, "unknown_class": 1, "duplicate_image_id": 1, "degenerate_box": 1, "box_outside": 1, "box_clipped": 1,
                               "bad_box": 2, "no_objects": 1, "size_mismatch": 1, "missing_size": 1, "orphan_annotation": 1}  # fmt: skip
    assert val["stages"] == ["val", "test"] and val["counts"] == {} and val["samples"] == 1
    assert "ERROR   duplicate_image_id" in text and "PROBLEMS FOUND: 8 errors, 4 warnings in 13 samples" in text
    # the command line, on the clean file alone
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_dataset_script", Path(__file__).resolve().parents[1] / "scripts" / "check_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--quiet", *overrides[:2], f"data.train_sets={sets['val']}", f"data.val_sets={sets['val']}", f"data.test_sets={sets['val']}"]
    assert script.main(argv) == 0
    assert "OK: 0 errors, 0 warnings in 1 samples" in capsys.readouterr().out
    # a missing file is an error of the report, not a crash
    argv = ["--quiet", *overrides[:2], "data.classes=[cat,dog]", "data.train_sets=[{format: coco, images: images, annotations: gone.json}]"]
    assert script.main(argv) == 1
    assert "bad_json" in capsys.readouterr().out


def test_coco_config_needs_its_root_and_holds_out_by_image_id(tmp_path, data_dir):
    from omegaconf.errors import InterpolationResolutionError

    with pytest.raises(InterpolationResolutionError, match=r"relative but no root is given \(set data.root\)"):
        list(compose_config(["data=coco"]).data.classes)
    with pytest.raises(InterpolationResolutionError, match=r"/nowhere/annotations/instances_train2017\.json: annotation not found"):
        list(compose_config(["data=coco", "data.root=/nowhere"]).data.classes)
    # data.val_holdout on a COCO set: the held-out image ids (SHA-1 of "12", not of "000012")
    dm = build_datamodule(compose_config([f"paths.data_dir={data_dir}", "data=shapes_coco", *SMALL_DATA, "data.val_holdout=0.25"]))
    dm.setup("fit")
    train_ids, val_ids = dm.datasets["train"].voc.ids, dm.datasets["val"].voc.ids
    assert sorted(train_ids + val_ids, key=int) == [str(i) for i in range(24)] and 2 <= len(val_ids) <= 12
    assert dm.set_names("val") == ["holdout 25% of shapes_coco/train"]


# ---------------------------------------------------------------------- metrics against COCOeval
def test_our_coco_map_is_cocoevals_on_the_written_results(shapes_root, tmp_path):
    """Detections near the training ground truth (24 images, 6 crowd objects) (jittered, some of the wrong class, some on crowd
    objects, false positives), scored by DetectionMetrics and by COCOeval on the results file
    against the dataset's own instances_train.json."""
    dataset = COCODetection(os.path.join(shapes_root, "JPEGImages"), coco_path(shapes_root, "train"))
    rng = torch.Generator().manual_seed(0)
    metrics = DetectionMetrics(SHAPE_CLASSES, recall_counts=())
    detections, ground_truth = [], []
    for item in dataset:
        gt = item["boxes"]
        jitter = (torch.rand(gt.shape, generator=rng) - 0.5) * 0.3 * (gt[:, 2:] - gt[:, :2]).repeat(1, 2)
        fp = torch.rand(3, 2, generator=rng) * 150
        boxes = torch.cat((gt + jitter, gt, torch.cat((fp, fp + 40), dim=1)))
        labels = torch.cat((item["labels"], torch.randint(1, 7, (len(gt) + 3,), generator=rng)))
        det = {"boxes": boxes, "scores": torch.rand(len(boxes), generator=rng), "labels": labels}
        metrics.update(det, gt, item["labels"], item["difficult"])
        detections.append(det)
        ground_truth.append({"boxes": gt, "labels": item["labels"], "difficult": item["difficult"], "size": tuple(item["image"].shape[-2:])})
    ours = metrics.compute()
    assert 0.2 < ours["coco/map"] < 0.9 and sum(d.sum() for d in (i["difficult"] for i in ground_truth)) > 0  # meaningful, with crowds
    files = write_coco_files(str(tmp_path), "train", SHAPE_CLASSES, dataset.ids, detections, ground_truth, dataset)
    assert files["coco_gt"] == coco_path(shapes_root, "train")
    results = json.loads(Path(files["coco_results"]).read_text())
    assert set(results[0]) == {"image_id", "category_id", "bbox", "score"} and len(results) == sum(len(d["boxes"]) for d in detections)
    assert_same_as_cocoeval(ours, cocoeval(files["coco_gt"], files["coco_results"]))
    # COCOeval's own float64 thresholds: a recall of exactly 0.07 (7 of 100 objects) reaches its
    # 0.07 but not torchmetrics' 0.0700000003 (torchmetrics keeps its thresholds in float32,
    # also when given float64 ones), so the precision read there differs: 1.2e-4 in coco/map
    # here, 2.8e-4 at most (map_large)
    stock = cocoeval(files["coco_gt"], files["coco_results"], thresholds="coco")
    assert 0 < largest_difference(ours, stock) < 1e-3
    # the same detections as VOC-layout data: positions as image ids, the ground truth written beside
    voc_files = write_coco_files(str(tmp_path / "voc"), "train", SHAPE_CLASSES, dataset.ids, detections, ground_truth)
    assert voc_files["coco_gt"] == str(tmp_path / "voc" / "coco_train_gt.json")
    assert_same_as_cocoeval(ours, cocoeval(voc_files["coco_gt"], voc_files["coco_results"]))


# ---------------------------------------------------------------------- train and eval end to end
@pytest.fixture(scope="module")
def trained_coco(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("coco_train")
    cfg = compose_config([f"paths.output_dir={out}", f"paths.data_dir={data_dir}", "logger=none", "data=shapes_coco", *SMALL_DATA, *TINY_NET,
                          "trainer.max_steps=2", "trainer.max_epochs=1", "trainer.limit_val_batches=2"])  # fmt: skip
    return train(cfg)


def test_train_on_coco_data(trained_coco):
    metrics = trained_coco
    assert metrics["status"] == "completed" and metrics["steps"] == 2 and metrics["selected_on"]["sets"] == ["shapes_coco/val"]
    assert 0.0 <= metrics["final"]["val/map"] <= 1.0 and "val/coco/map" in metrics["final"]
    ckpt = torch.load(metrics["checkpoints"]["last"], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["model_cfg"]["classes"] == list(SHAPE_CLASSES)


def test_eval_writes_coco_results_that_cocoeval_scores_as_we_do(trained_coco, tmp_path, data_dir):
    def run(data: str, out: Path) -> dict:
        overrides = [f"ckpt_path={trained_coco['checkpoints']['last']}", f"paths.output_dir={out}", f"paths.data_dir={data_dir}", f"data={data}", *SMALL_DATA, "split=val"]
        return evaluate(compose_config(overrides, config_name="eval"))

    coco = run("shapes_coco", tmp_path / "coco")
    results = tmp_path / "coco" / "results" / "coco_val_bbox.json"
    assert coco["coco_results"] == str(results) and coco["coco_gt"].endswith(os.path.join("annotations", "instances_val.json"))
    rows = json.loads(results.read_text())
    assert rows and {r["image_id"] for r in rows} <= {int(i) for i in range(24, 32)} and {r["category_id"] for r in rows} <= set(range(1, 7))
    assert_same_as_cocoeval(coco["metrics"], cocoeval(coco["coco_gt"], str(results)), prefix="val/")
    # the same checkpoint on the VOC copy: the same numbers, and a ground-truth file that COCOeval agrees with too
    voc = run("shapes", tmp_path / "voc")
    assert voc["metrics"].keys() == coco["metrics"].keys() and os.path.isfile(voc["coco_gt"])
    for key, value in coco["metrics"].items():
        assert voc["metrics"][key] == value or (math.isnan(value) and math.isnan(voc["metrics"][key])), key
    assert_same_as_cocoeval(voc["metrics"], cocoeval(voc["coco_gt"], voc["coco_results"]), prefix="val/")
