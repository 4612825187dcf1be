"""Bad and untrusted data: every case is built on disk here and its outcome checked.

check_dataset reports every problem with its file; the DataModule skips or stops as
``data.on_bad_sample`` says, up front where it can; images of every mode and EXIF rotation load
as RGB with boxes that match; XML bombs, path tricks, image bombs and pickled checkpoints are
refused.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasterrcnn.build import build_datamodule
from fasterrcnn.data import DatasetError, VOCDataModule, VOCDetection
from fasterrcnn.data import voc as voc_module
from fasterrcnn.data.check import bad_samples, check_sample, check_split, report_dataset
from fasterrcnn.data.voc import image_size, load_image, parse_voc_xml, read_split

from .conftest import compose_config
from .helpers import write_voc
CLASSES = ("cat", "dog")
SIZE = (40, 50)  # (height, width) of write_voc's images
CAT = [("cat", (11, 11, 30, 20), 0)]


def _xml(root: str, image_id: str, text: str | bytes) -> str:
    path = os.path.join(root, "Annotations", f"{image_id}.xml")
    with open(path, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    return path


def _annotation(objects: str, width: int = SIZE[1], height: int = SIZE[0]) -> str:
    return f"<annotation><size><width>{width}</width><height>{height}</height><depth>3</depth></size>{objects}</annotation>"


def _object(name: str, box, difficult: int = 0) -> str:
    xmin, ymin, xmax, ymax = box
    return f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"


def _truncate(path: str) -> None:
    """Keep the JPEG's header, cut its pixel data: opens lazily, fails to decode."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])


BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol "lol">\n'
    + "".join(f' <!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">\n' for i in range(1, 10))
    + "]>\n<annotation><object><name>&lol9;</name></object></annotation>"
)


def _bad_dataset(tmp_path) -> tuple[str, dict[str, set[str]]]:
    """A VOC folder with one sample per problem kind; returns it and id -> expected kinds."""
    ids = ["good", "noimage", "badimage", "noxml", "malformed", "bomb", "degenerate", "outside", "clipped", "unknown", "empty", "mismatch", "badbox", "twice"]
    root = write_voc(tmp_path, {i: CAT for i in ids}, CLASSES, size=SIZE, split="train")
    os.remove(os.path.join(root, "JPEGImages", "noimage.jpg"))
    Path(root, "JPEGImages", "badimage.jpg").write_bytes(b"this is not an image")
    os.remove(os.path.join(root, "Annotations", "noxml.xml"))
    _xml(root, "malformed", "<annotation><size><width>50</width>")
    _xml(root, "bomb", BILLION_LAUGHS)
    _xml(root, "degenerate", _annotation(_object("cat", (30, 11, 20, 20))))
    _xml(root, "outside", _annotation(_object("cat", (60, 11, 70, 20))))
    _xml(root, "clipped", _annotation(_object("dog", (0, 11, 55, 20))))
    _xml(root, "unknown", _annotation(_object("zebra", (11, 11, 30, 20))))
    _xml(root, "empty", _annotation(""))
    _xml(root, "mismatch", _annotation(_object("cat", (11, 11, 30, 20)), width=500, height=375))
    _xml(root, "badbox", _annotation(_object("cat", ("abc", 11, 30, 20)) + _object("dog", ("nan", 1, 2, 3))))
    # two problems in one file: both are reported, not only the first
    _xml(root, "twice", _annotation(_object("zebra", (11, 11, 30, 20)) + _object("cat", (30, 11, 20, 20))))
    expected = {
        "good": set(),
        "noimage": {"missing_image"},
        "badimage": {"unreadable_image"},
        "noxml": {"missing_xml"},
        "malformed": {"malformed_xml"},
        "bomb": {"unsafe_xml"},
        "degenerate": {"degenerate_box"},
        "outside": {"box_outside"},
        "clipped": {"box_clipped"},
        "unknown": {"unknown_class"},
        "empty": {"no_objects"},
        "mismatch": {"size_mismatch"},
        "badbox": {"bad_box"},
        "twice": {"unknown_class", "degenerate_box"},
    }
    return root, expected


# ------------------------------------------------------------------------- check_dataset
def test_check_split_reports_every_problem_with_its_file(tmp_path):
    root, expected = _bad_dataset(tmp_path)
    problems = check_split(root, "train", CLASSES)
    found: dict[str, set[str]] = {i: set() for i in expected}
    for p in problems:
        found[p.image_id].add(p.kind)
        folder = "JPEGImages" if p.kind in ("missing_image", "unreadable_image") else "Annotations"
        assert p.file == os.path.join(root, folder, f"{p.image_id}.{'jpg' if folder == 'JPEGImages' else 'xml'}")
        assert p.image_id in str(p)  # the message names the file
    assert found == expected
    assert sum(p.kind == "bad_box" for p in problems) == 2  # "abc" and "nan", each reported
    # warnings leave the sample usable; errors make it bad
    assert set(bad_samples(problems)) == {i for i, kinds in expected.items() if kinds - {"box_clipped", "no_objects"}}


def test_check_dataset_report_summarises_and_exits_1(tmp_path, capsys):
    root, expected = _bad_dataset(tmp_path)
    write_voc(tmp_path, {"good": CAT}, CLASSES, size=SIZE, split="val")  # a clean split beside it
    out = tmp_path / "report.json"
    base = ["data=voc", f"data.root={root}", "data.classes=[cat,dog]", "data.train_sets=[{split: train}]", "data.val_sets=[{split: val}]", "data.test_sets=[{split: val}]"]
    status = report_dataset(build_datamodule(compose_config([*base, f"paths.output_dir={tmp_path / 'out'}"])), json_path=out)
    text = capsys.readouterr().out
    assert status == 1
    report = json.loads(out.read_text())
    train, val = report["splits"]
    assert train["stages"] == ["train"] and train["samples"] == len(expected)
    assert train["counts"]["size_mismatch"] == 1 and train["counts"]["bad_box"] == 2 and train["counts"]["unknown_class"] == 2
    assert val["stages"] == ["val", "test"] and val["counts"] == {}  # a split of two stages is checked once
    assert "mismatch.xml" in text and "PROBLEMS FOUND" in text
    # the clean split alone passes
    assert report_dataset(build_datamodule(compose_config([*base, "data.train_sets=[{split: val}]", f"paths.output_dir={tmp_path / 'out'}"]))) == 0
    assert "OK: 0 errors, 0 warnings in 1 samples" in capsys.readouterr().out


def test_check_sample_decode_finds_corrupt_pixels(tmp_path):
    root = write_voc(tmp_path, {"cut": CAT}, CLASSES, size=SIZE)
    _truncate(os.path.join(root, "JPEGImages", "cut.jpg"))
    assert check_sample(root, "cut", {"cat": 1, "dog": 2}) == []  # the header is fine
    assert [p.kind for p in check_sample(root, "cut", {"cat": 1, "dog": 2}, decode=True)] == ["unreadable_image"]


# ------------------------------------------------------------------------- training policy
def _datamodule(root: str, on_bad_sample: str, **kwargs) -> VOCDataModule:
    return VOCDataModule(
        "test", CLASSES, root=root, train_sets=[{"split": "train"}], val_sets=[{"split": "train"}],
        min_size=40, max_size=80, num_workers=0, flip_prob=0.0, on_bad_sample=on_bad_sample, **kwargs,
    )  # fmt: skip


def test_error_policy_stops_at_setup_naming_the_files(tmp_path):
    root, _ = _bad_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"11 of 14 train samples are bad(.|\n)*noimage\.jpg: image not found(.|\n)*and 6 more") as err:
        _datamodule(root, "error").setup("fit")
    assert "on_bad_sample=skip" in str(err.value)


def test_skip_policy_drops_bad_samples_with_a_warning_and_a_count(tmp_path, caplog):
    root, expected = _bad_dataset(tmp_path)
    dm = _datamodule(root, "skip")
    with caplog.at_level(logging.WARNING, logger="fasterrcnn.data.datamodule"):
        dm.setup("fit")
    assert "skipping 11 of 14 train samples" in caplog.text and "boxes reach outside their image and are clipped" in caplog.text
    assert dm.skipped["train"] == 11 and len(dm.problems["train"]) == 11
    kept = dm.datasets["train"].voc.ids
    assert kept == ["good", "clipped", "empty"]
    items = {item["image_id"]: item for item in (dm.datasets["train"][i] for i in range(3))}
    # the clipped box ends at the image's border; the image without objects trains as background
    torch.testing.assert_close(items["clipped"]["original_boxes"], torch.tensor([[0.0, 10.0, 50.0, 20.0]]))
    assert items["empty"]["boxes"].shape == (0, 4)


def test_image_failing_to_decode_in_training(tmp_path):
    """Found only when decoded: "error" raises naming it; "skip" serves the next good training
    sample, counted by the DataModule from the batch (as it would from a DataLoader worker),
    and drops it from validation in setup (a replacement would count an image twice in the mAP)."""
    root = write_voc(tmp_path, {"a": CAT, "cut": CAT, "b": CAT}, CLASSES, size=SIZE, split="train")
    _truncate(os.path.join(root, "JPEGImages", "cut.jpg"))
    strict = _datamodule(root, "error")
    strict.setup("fit")
    with pytest.raises(DatasetError, match=r"cut\.jpg: cannot decode"):
        strict.datasets["train"][1]
    dm = _datamodule(root, "skip")
    dm.setup("fit")
    assert dm.skipped == {"train": 0, "val": 1, "test": 0} and dm.datasets["val"].voc.ids == ["a", "b"]
    ids = []
    for batch in dm.train_dataloader():
        batch = dm.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        ids += batch.image_ids
    assert sorted(ids) == ["a", "b", "b"] and dm.skipped["train"] == 1 and "cut.jpg" in dm.problems["train"][0]


def test_skip_policy_trains_through_a_corrupt_image(make_cfg, tmp_path):
    from fasterrcnn.training import train

    root = write_voc(tmp_path, {"a": CAT, "cut": CAT, "b": [("dog", (5, 5, 40, 30), 0)]}, CLASSES, size=SIZE, split="trainval")
    _truncate(os.path.join(root, "JPEGImages", "cut.jpg"))
    cfg = make_cfg(
        ["data=voc", f"data.root={root}", "data.classes=[cat,dog]", "data.val_sets=[{split: trainval}]", "data.min_size=48", "data.max_size=80"]
        + ["data.on_bad_sample=skip", "data.num_workers=0", "backbone.widths=[8,16,16,32]", "backbone.head_features=64"]
        + ["trainer.max_epochs=1", "trainer.limit_val_batches=1"],
        small_data=False,
    )
    assert train(cfg)["status"] == "completed"
    cfg.data.on_bad_sample = "error"
    with pytest.raises(DatasetError, match=r"cut\.jpg"):
        train(cfg)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="on_bad_sample"):
        VOCDataModule("x", CLASSES, root="nowhere", on_bad_sample="ignore")


def test_reader_never_returns_boxes_for_another_image_size(tmp_path):
    root = write_voc(tmp_path, {"m": CAT}, CLASSES, size=SIZE)
    _xml(root, "m", _annotation(_object("cat", (11, 11, 30, 20)), width=500, height=375))
    with pytest.raises(DatasetError, match=r"m\.xml: <size> says 500x375 but the image .*m\.jpg is 50x40"):
        VOCDetection(root, "trainval", CLASSES)[0]


# ------------------------------------------------------------------------- image modes
def _voc_with_image(tmp_path, image: Image.Image, box, fmt: str = "JPEG", xml_size=None, **save) -> str:
    """A one-sample VOC folder whose JPEGImages/x.jpg is ``image`` saved as ``fmt`` (the reader
    goes by content, not by extension) and whose annotation has ``box`` and the image's size."""
    width, height = xml_size or image.size
    root = write_voc(tmp_path, {"x": []}, CLASSES, size=(height, width))
    image.save(os.path.join(root, "JPEGImages", "x.jpg"), format=fmt, **save)
    _xml(root, "x", _annotation(_object("cat", box), width=width, height=height))
    return root


@pytest.mark.parametrize(
    "mode, colour, fmt, expected",
    [
        ("L", 100, "JPEG", (100, 100, 100)),
        ("RGBA", (0, 255, 0, 128), "PNG", (0, 255, 0)),
        ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),
        ("P", None, "PNG", (0, 0, 255)),
        ("LA", (200, 50), "PNG", (200, 200, 200)),
    ],
)
def test_every_image_mode_loads_as_rgb(tmp_path, mode, colour, fmt, expected):
    if mode == "P":
        image = Image.new("RGB", (50, 40), (0, 0, 255)).convert("P")
    else:
        image = Image.new(mode, (50, 40), colour)
    root = _voc_with_image(tmp_path, image, (11, 11, 30, 20), fmt=fmt)
    assert check_split(root, "trainval", CLASSES) == []
    item = VOCDetection(root, "trainval", CLASSES)[0]
    assert item["image"].shape == (3, 40, 50) and item["image"].dtype == torch.uint8
    mean = item["image"].float().mean(dim=(1, 2))
    torch.testing.assert_close(mean, torch.tensor(expected, dtype=torch.float32), atol=3.0, rtol=0.0)


def test_16_bit_grey_keeps_its_brightness(tmp_path):
    """16-bit values map to 8 bits by /257 (65535 -> 255): a dark image stays dark rather than
    being stretched to its own maximum."""
    arr = np.full((40, 50), 1000, dtype=np.uint16)
    arr[:, 25:] = 2000
    image = Image.fromarray(arr)
    assert image.mode.startswith("I")
    root = _voc_with_image(tmp_path, image, (11, 11, 30, 20), fmt="PNG")
    item = VOCDetection(root, "trainval", CLASSES)[0]
    assert item["image"].shape == (3, 40, 50)
    assert item["image"][:, 0, 0].tolist() == [4, 4, 4] and item["image"][:, 0, -1].tolist() == [8, 8, 8]


def _rotated_marker_image() -> Image.Image:
    """60 x 40 stored pixels, a red block at x 40..49, y 5..14, and EXIF orientation 6 (shown
    turned 90 degrees clockwise: 40 x 60, the block at x 25..34, y 40..49)."""
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[5:15, 40:50] = (255, 0, 0)
    image = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.info["exif"] = exif.tobytes()
    return image


def test_exif_rotation_is_applied_and_boxes_match(tmp_path):
    """Annotation tools label the image as displayed (after its EXIF rotation): the XML's size
    is the displayed size and the box lands on the block."""
    image = _rotated_marker_image()
    root = _voc_with_image(tmp_path, image, (26, 41, 35, 50), xml_size=(40, 60), exif=image.info["exif"], quality=100)
    assert image_size(os.path.join(root, "JPEGImages", "x.jpg")) == (60, 40)
    assert check_split(root, "trainval", CLASSES) == []
    item = VOCDetection(root, "trainval", CLASSES)[0]
    assert item["image"].shape == (3, 60, 40)
    torch.testing.assert_close(item["boxes"], torch.tensor([[25.0, 40.0, 35.0, 50.0]]))
    x0, y0, x1, y1 = item["boxes"][0].int().tolist()
    inside = item["image"][:, y0:y1, x0:x1].float().mean(dim=(1, 2))
    assert inside[0] > 200 and inside[1] < 60 and inside[2] < 60  # the red block


def test_exif_rotation_against_an_unrotated_annotation_is_reported(tmp_path):
    image = _rotated_marker_image()
    root = _voc_with_image(tmp_path, image, (41, 6, 50, 15), xml_size=(60, 40), exif=image.info["exif"], quality=100)
    (problem,) = check_split(root, "trainval", CLASSES)
    assert problem.kind == "size_mismatch" and "swapped" in problem.message and problem.file.endswith("x.xml")
    with pytest.raises(DatasetError, match="after EXIF rotation"):
        VOCDetection(root, "trainval", CLASSES)[0]


# ------------------------------------------------------------------------- untrusted files
@pytest.mark.parametrize(
    "text",
    [
        BILLION_LAUGHS,
        '<?xml version="1.0"?>\n  <!DOCTYPE annotation SYSTEM "file:///etc/passwd"><annotation/>',  # external DTD
        # UTF-16: no "<!DOCTYPE" byte string to find, and the entity would name the class
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a [<!ENTITY c "cat">]>'
        "<annotation><size><width>50</width><height>40</height></size><object><name>&c;</name>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>",
    ],
)
def test_dtds_and_entities_are_refused(tmp_path, text):
    path = tmp_path / "a.xml"
    path.write_bytes(text.encode("utf-16") if 'encoding="UTF-16"' in text else text.encode())
    with pytest.raises(DatasetError, match=r"a\.xml: DTD or entity declarations are not allowed"):
        parse_voc_xml(str(path), {"cat": 1})


def test_odd_doctype_spellings_are_refused_too(tmp_path):
    for i, text in enumerate(['<!doctype a [<!ENTITY x "y">]><annotation>&x;</annotation>', '<annotation><!ENTITY x "y"></annotation>']):
        path = tmp_path / f"{i}.xml"
        path.write_text(text)
        with pytest.raises(DatasetError, match=rf"{i}\.xml: (malformed|DTD)"):
            parse_voc_xml(str(path), {"cat": 1})


def test_huge_annotation_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setattr(voc_module, "MAX_ANNOTATION_BYTES", 64)
    path = tmp_path / "big.xml"
    path.write_text(_annotation(_object("cat", (1, 1, 9, 9))))
    with pytest.raises(DatasetError, match=r"big\.xml: larger than"):
        parse_voc_xml(str(path), {"cat": 1})


def test_filename_field_is_never_used(tmp_path):
    """The image comes from the split's id: an annotation naming another file changes nothing."""
    root = write_voc(tmp_path, {"x": CAT}, CLASSES, size=SIZE)
    decoy = tmp_path / "decoy.png"
    Image.new("RGB", (50, 40), (255, 255, 255)).save(decoy)
    for target in ("../../decoy.png", str(decoy), "../../../../../../etc/passwd"):
        text = _annotation(_object("cat", (11, 11, 30, 20))).replace("<annotation>", f"<annotation><filename>{target}</filename><path>{target}</path>")
        _xml(root, "x", text)
        item = VOCDetection(root, "trainval", CLASSES)[0]
        assert torch.equal(item["image"], load_image(os.path.join(root, "JPEGImages", "x.jpg")))
        assert float(item["image"].float().mean()) < 200  # the random image, not the white decoy


@pytest.mark.parametrize("image_id", ["../x", "a/b", "a\\b", "..", "/etc/passwd"])
def test_split_ids_with_path_separators_are_refused(tmp_path, image_id):
    root = write_voc(tmp_path, {"x": CAT}, CLASSES, size=SIZE)
    Path(root, "ImageSets", "Main", "trainval.txt").write_text(f"x\n{image_id}\n")
    with pytest.raises(DatasetError, match="not an image id"):
        read_split(root, "trainval")
    assert [p.kind for p in check_split(root, "trainval", CLASSES)] == ["bad_split"]
    dm = VOCDataModule("t", CLASSES, root=root, train_sets=[{"split": "trainval"}], val_sets=[{"split": "trainval"}], on_bad_sample="skip")
    with pytest.raises(DatasetError, match="not an image id"):  # refused under both policies
        dm.setup("fit")


def test_image_bomb_is_refused(tmp_path, monkeypatch):
    """PIL refuses images above 2 x MAX_IMAGE_PIXELS before decoding; here the limit is lowered
    instead of writing a giant file."""
    root = write_voc(tmp_path, {"x": CAT}, CLASSES, size=SIZE)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DatasetError, match=r"x\.jpg: cannot decode"):
        VOCDetection(root, "trainval", CLASSES)[0]
    assert [p.kind for p in check_split(root, "trainval", CLASSES)] == ["unreadable_image"]


def _ran(path: str) -> None:
    """What a checkpoint's pickle would run if it were unpickled in full."""
    Path(path).write_text("code ran")


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return _ran, (self.path,)


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    from fasterrcnn.lit import FasterRCNNModule

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model_cfg": _Payload(str(marker))}}, ckpt)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        FasterRCNNModule.load(str(ckpt))
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # what the refusal prevents
    assert marker.read_text() == "code ran"
