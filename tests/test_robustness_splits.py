"""Split files, odd files on disk and the object cap: each case is built on disk and its outcome
checked through the reader, the DataModule's setup and check_dataset.

A split file that is not UTF-8, is empty or lists an id twice; a byte-order mark; a directory
named like an image; control characters in ids; symbolic links leading out of the dataset
folder; an annotation with more objects than ``data.max_objects``; skipped samples counted by
kind in ``metrics.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from fasterrcnn.build import build_datamodule
from fasterrcnn.data import DatasetError, VOCDataModule, VOCDetection
from fasterrcnn.data.check import check_sample, check_split, report_dataset
from fasterrcnn.data.voc import read_split

from .conftest import compose_config
from .helpers import write_voc

CLASSES = ("cat", "dog")
SIZE = (40, 50)  # (height, width) of write_voc's images
CAT = [("cat", (11, 11, 30, 20), 0)]
TINY_RUN = ["backbone.widths=[8,16,16,32]", "backbone.head_features=64", "data.min_size=48", "data.max_size=80", "data.num_workers=0"]


def _split_file(root: str, split: str = "train") -> Path:
    return Path(root, "ImageSets", "Main", f"{split}.txt")


def _datamodule(root: str, on_bad_sample: str = "error", train: str = "train", val: str = "train", **kwargs) -> VOCDataModule:
    return VOCDataModule(
        "test", CLASSES, root=root, train_sets=[{"split": train}], val_sets=[{"split": val}],
        min_size=40, max_size=80, num_workers=0, flip_prob=0.0, on_bad_sample=on_bad_sample, **kwargs,
    )  # fmt: skip


def _check_dataset(tmp_path, root: str, *overrides: str, strict: bool = False, json_path: Path | None = None, train: str = "train", val: str = "train") -> int:
    """check_dataset's report (fasterrcnn.data.check.report_dataset) of ``root``; its exit status."""
    base = ["data=voc", f"data.root={root}", "data.classes=[cat,dog]", f"data.train_sets=[{{split: {train}}}]", f"data.val_sets=[{{split: {val}}}]"]
    cfg = compose_config([*base, f"data.test_sets=[{{split: {val}}}]", f"paths.output_dir={tmp_path / 'out'}", *overrides])
    return report_dataset(build_datamodule(cfg), strict=strict, json_path=json_path)


# ------------------------------------------------------------------------- split files
@pytest.mark.parametrize(
    ("content", "where"),
    [
        (b"a\nb\xffc\n", r"line 2: not UTF-8 text \(byte 0xff at column 2\)"),
        ("a\ncafé\n".encode("latin-1"), r"line 2: not UTF-8 text \(byte 0xe9"),
        ("a\nb\n".encode("utf-16"), "is UTF-16 text"),
    ],
)
def test_split_file_that_is_not_utf8_is_refused_naming_file_and_line(tmp_path, capsys, content, where):
    root = write_voc(tmp_path, {"a": CAT, "b": CAT}, CLASSES, size=SIZE, split="train")
    _split_file(root).write_bytes(content)
    pattern = rf"{_split_file(root)}: {where}"
    with pytest.raises(DatasetError, match=pattern):
        read_split(root, "train")
    with pytest.raises(DatasetError, match=pattern):
        _datamodule(root, "skip").setup("fit")  # refused under both policies
    (problem, *_) = check_split(root, "train", CLASSES)
    assert problem.kind == "bad_split" and problem.file == str(_split_file(root))
    # check_dataset reports it with the file (status 1), it does not raise (the script's status 2)
    assert _check_dataset(tmp_path, root) == 1
    assert f"{_split_file(root)}:" in capsys.readouterr().out


def test_byte_order_mark_is_accepted(tmp_path):
    root = write_voc(tmp_path, {"a": CAT, "b": CAT}, CLASSES, size=SIZE, split="train")
    _split_file(root).write_bytes(b"\xef\xbb\xbfa\r\nb\r\n")  # as Windows Notepad saves it
    assert read_split(root, "train") == ["a", "b"]
    assert check_split(root, "train", CLASSES) == []
    assert VOCDetection(root, "train", CLASSES)[0]["image_id"] == "a"


def test_duplicate_ids_are_read_once_with_one_warning(tmp_path, caplog):
    root = write_voc(tmp_path, {"a": CAT, "b": CAT, "c": CAT}, CLASSES, size=SIZE, split="train")
    _split_file(root).write_text("a\nb\na\nc\nb\na\n")
    with caplog.at_level(logging.WARNING, logger="fasterrcnn.data.voc"):
        dm = _datamodule(root)
        dm.setup("fit")
    # train and val (the same file) each read it once: one warning each, naming file, ids, lines
    warnings = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert len(warnings) == 2 and str(_split_file(root)) in warnings[0]
    assert "'a' is listed on lines 1, 3, 6" in warnings[0] and "'b' is listed on lines 2, 5" in warnings[0]
    # each image once in training and in evaluation (the mAP is over the dataset's items)
    assert len(dm.datasets["train"]) == 3 and dm.datasets["val"].voc.ids == ["a", "b", "c"]
    problems = check_split(root, "train", CLASSES)
    assert [(p.kind, p.severity, p.image_id) for p in problems] == [("duplicate_id", "warning", "a"), ("duplicate_id", "warning", "b")]


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_split_is_an_error_before_training(tmp_path, content):
    root = write_voc(tmp_path, {"a": CAT}, CLASSES, size=SIZE, split="train")
    write_voc(tmp_path, {"a": CAT}, CLASSES, size=SIZE, split="val")
    _split_file(root, "empty").write_text(content)
    for train, val in (("empty", "val"), ("train", "empty")):
        for policy in ("error", "skip"):
            with pytest.raises(DatasetError, match=rf"{_split_file(root, 'empty')}: lists no image ids"):
                _datamodule(root, policy, train=train, val=val).setup("fit")
    assert [p.kind for p in check_split(root, "empty", CLASSES)] == ["bad_split"]


def test_empty_train_split_stops_train_before_any_step(make_cfg, tmp_path):
    from fasterrcnn.training import train

    root = write_voc(tmp_path, {"a": CAT}, CLASSES, size=SIZE, split="val")
    _split_file(root, "train").write_text("\n")
    data = ["data=voc", f"data.root={root}", "data.classes=[cat,dog]", "data.train_sets=[{split: train}]", "data.val_sets=[{split: val}]"]
    cfg = make_cfg(data + TINY_RUN, small_data=False)
    with pytest.raises(DatasetError, match=rf"{_split_file(root, 'train')}: lists no image ids"):
        train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["steps"] == 0 and "lists no image ids" in metrics["error"]


# ------------------------------------------------------------------------- files on disk
def test_directory_named_like_an_image_or_annotation_says_so(tmp_path):
    root = write_voc(tmp_path, {"a": CAT, "d": CAT, "x": CAT}, CLASSES, size=SIZE, split="train")
    os.remove(os.path.join(root, "JPEGImages", "d.jpg"))
    os.makedirs(os.path.join(root, "JPEGImages", "d.jpg"))
    os.remove(os.path.join(root, "Annotations", "x.xml"))
    os.makedirs(os.path.join(root, "Annotations", "x.xml"))
    index = {"cat": 1, "dog": 2}
    assert [(p.kind, p.message) for p in check_sample(root, "d", index)] == [("missing_image", "is a directory, not an image file")]
    assert [(p.kind, p.message) for p in check_sample(root, "x", index)] == [("missing_xml", "is a directory, not an annotation file")]
    with pytest.raises(DatasetError, match=r"d\.jpg: is a directory, not an image file") as err:
        _datamodule(root).setup("fit")
    assert "not found" not in str(err.value)
    with pytest.raises(DatasetError, match=r"d\.jpg: is a directory"):  # the reader itself too
        VOCDetection(root, "train", CLASSES, ids=["d"])[0]


def test_control_characters_in_ids_are_printed_escaped(tmp_path, capsys):
    image_id = "a\x1b[2Jb"  # "clear the screen", if printed as is
    root = write_voc(tmp_path, {image_id: CAT, "ok": CAT}, CLASSES, size=SIZE, split="train")
    os.remove(os.path.join(root, "JPEGImages", f"{image_id}.jpg"))
    (problem,) = check_split(root, "train", CLASSES)
    assert problem.image_id == image_id  # the data keeps the real id; only printing escapes it
    assert "a\\x1b[2Jb.jpg: image not found" in str(problem) and "\x1b" not in str(problem)
    with pytest.raises(DatasetError) as err:
        _datamodule(root).setup("fit")
    assert "a\\x1b[2Jb.jpg" in str(err.value) and "\x1b" not in str(err.value)
    assert _check_dataset(tmp_path, root) == 1
    out = capsys.readouterr().out
    assert "a\\x1b[2Jb.jpg" in out and "\x1b" not in out


def test_link_outside_the_dataset_is_followed_and_reported(tmp_path, capsys):
    root = write_voc(tmp_path / "ds", {"in": CAT, "out": CAT, "near": CAT}, CLASSES, size=SIZE, split="train")
    elsewhere = tmp_path / "other_disk"
    elsewhere.mkdir()
    images = Path(root, "JPEGImages")
    os.replace(images / "out.jpg", elsewhere / "out.jpg")
    os.symlink(elsewhere / "out.jpg", images / "out.jpg")
    os.replace(images / "near.jpg", Path(root, "near.jpg"))  # a link that stays inside: fine
    os.symlink(Path("..", "near.jpg"), images / "near.jpg")
    problems = check_split(root, "train", CLASSES)
    assert [(p.kind, p.severity, p.image_id) for p in problems] == [("outside_link", "warning", "out")]
    assert str(elsewhere / "out.jpg") in problems[0].message
    # followed in training (datasets on other disks are common)
    assert VOCDetection(root, "train", CLASSES)[1]["image_id"] == "out"
    _datamodule(root).setup("fit")
    assert _check_dataset(tmp_path, root) == 0  # a warning
    assert "outside_link" in capsys.readouterr().out
    assert _check_dataset(tmp_path, root, strict=True) == 1
    # a linked folder leads everything in it outside
    os.replace(Path(root, "Annotations"), elsewhere / "Annotations")
    os.symlink(elsewhere / "Annotations", Path(root, "Annotations"))
    kinds = [(p.kind, os.path.basename(p.file)) for p in check_split(root, "train", CLASSES)]
    assert sorted(kinds) == [("outside_link", "in.xml"), ("outside_link", "near.xml"), ("outside_link", "out.jpg"), ("outside_link", "out.xml")]


# ------------------------------------------------------------------------- data.max_objects
def _crowded(tmp_path, count: int = 5) -> str:
    root = write_voc(tmp_path, {"a": CAT, "crowd": [("cat", (1 + i, 1, 10 + i, 10), 0) for i in range(count)]}, CLASSES, size=SIZE, split="train")
    return root


def test_max_objects_is_in_every_data_config():
    for data in ("shapes", "voc2007", "voc2012", "voc0712"):
        assert compose_config([f"data={data}"]).data.max_objects == 2000
    with pytest.raises(ValueError, match="max_objects"):
        VOCDataModule("x", CLASSES, root="nowhere", max_objects=0)


def test_too_many_objects_stops_naming_the_file_and_count(tmp_path):
    root = _crowded(tmp_path)
    pattern = r"crowd\.xml: 5 objects, more than data\.max_objects=3"
    with pytest.raises(DatasetError, match=pattern):
        _datamodule(root, max_objects=3).setup("fit")
    with pytest.raises(DatasetError, match=pattern):  # the reader refuses it too
        VOCDetection(root, "train", CLASSES, max_objects=3)[1]
    _datamodule(root, max_objects=5).setup("fit")  # at the cap: fine
    _datamodule(root, max_objects=None).setup("fit")  # no cap
    assert len(VOCDetection(root, "train", CLASSES)[1]["boxes"]) == 5


def test_too_many_objects_is_a_counted_skip(tmp_path):
    dm = _datamodule(_crowded(tmp_path), "skip", max_objects=3)
    dm.setup("fit")
    assert dm.datasets["train"].voc.ids == ["a"]
    assert dm.skipped_by_kind == {"train": {"too_many_objects": 1}, "val": {"too_many_objects": 1}, "test": {}}
    assert dm.skipped == {"train": 1, "val": 1, "test": 0}  # the per-stage counts still work


def test_check_dataset_reports_too_many_objects(tmp_path, capsys):
    root = _crowded(tmp_path)
    assert [(p.kind, p.image_id) for p in check_split(root, "train", CLASSES, max_objects=3)] == [("too_many_objects", "crowd")]
    report = tmp_path / "report.json"
    assert _check_dataset(tmp_path, root, "data.max_objects=3", json_path=report) == 1
    assert "too_many_objects" in capsys.readouterr().out
    assert json.loads(report.read_text())["splits"][0]["counts"] == {"too_many_objects": 1}
    assert _check_dataset(tmp_path, root, "data.max_objects=null") == 0


# ------------------------------------------------------------------------- counting skips
def test_skips_while_reading_are_counted_by_kind(tmp_path):
    root = write_voc(tmp_path, {"a": CAT, "cut": CAT}, CLASSES, size=SIZE, split="train")
    path = Path(root, "JPEGImages", "cut.jpg")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])  # a good header, corrupt pixels
    dm = _datamodule(root, "skip")
    dm.setup("fit")
    for batch in dm.train_dataloader():
        dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert dm.skipped_by_kind == {"train": {"unreadable_image": 1}, "val": {"unreadable_image": 1}, "test": {}}


def test_skipped_samples_by_kind_in_metrics_json_and_the_logger(make_cfg, tmp_path):
    from fasterrcnn.training import train

    objects = {"a": CAT, "b": [("dog", (5, 5, 40, 30), 0)], "noimage": CAT, "crowd": [("cat", (1 + i, 1, 10 + i, 10), 0) for i in range(4)]}
    root = write_voc(tmp_path, objects, CLASSES, size=SIZE, split="trainval")
    os.remove(os.path.join(root, "JPEGImages", "noimage.jpg"))
    cfg = make_cfg(
        ["data=voc", f"data.root={root}", "data.classes=[cat,dog]", "data.val_sets=[{split: trainval}]", "data.on_bad_sample=skip", "data.max_objects=3"]
        + TINY_RUN
        + ["trainer.max_steps=2", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "logger=csv"],
        small_data=False,
    )
    metrics = train(cfg)
    assert metrics["status"] == "completed"
    expected = {"train": {"missing_image": 1, "too_many_objects": 1}, "val": {"missing_image": 1, "too_many_objects": 1}, "test": {}}
    on_disk = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert on_disk["skipped_samples"] == expected and metrics["skipped_samples"] == expected
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("skipped_samples/") and v}
    assert logged == {
        "skipped_samples/train": 2.0,
        "skipped_samples/train/missing_image": 1.0,
        "skipped_samples/train/too_many_objects": 1.0,
        "skipped_samples/val": 2.0,
        "skipped_samples/val/missing_image": 1.0,
        "skipped_samples/val/too_many_objects": 1.0,
        "skipped_samples/test": 0.0,
    }
