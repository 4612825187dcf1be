import os

import numpy as np
import pytest
import torch

from fasterrcnn.data import DatasetError, VOCDetection, collate
from fasterrcnn.data.dataset import DetectionDataset, SampleCache
from fasterrcnn.data.shapes import SHAPE_CLASSES, dataset_params, ensure_dataset, generate, render_image
from fasterrcnn.data.transforms import hflip, rescale_factor, resize
from fasterrcnn.data.voc import parse_voc_xml

from .helpers import write_voc


def test_voc_reader_converts_one_based_inclusive_coordinates(tmp_path):
    root = write_voc(tmp_path, {"img0": [("dog", (1, 1, 10, 20), 0), ("cat", (5, 6, 7, 8), 1)]}, classes=("cat", "dog"))
    ds = VOCDetection(root, "trainval", ("cat", "dog"))
    item = ds[0]
    assert item["image"].shape == (3, 40, 50) and item["image"].dtype == torch.uint8
    torch.testing.assert_close(item["boxes"], torch.tensor([[0.0, 0.0, 10.0, 20.0], [4.0, 5.0, 7.0, 8.0]]))
    assert item["labels"].tolist() == [2, 1]
    assert item["difficult"].tolist() == [False, True]


def test_voc_reader_errors_name_the_file(tmp_path):
    root = write_voc(tmp_path, {"img0": [("zebra", (1, 1, 10, 10), 0)]}, classes=("cat",))
    ds = VOCDetection(root, "trainval", ("cat",))
    with pytest.raises(DatasetError, match=r"img0\.xml.*unknown class 'zebra'"):
        ds[0]
    with pytest.raises(DatasetError, match=r"ImageSets/Main/missing\.txt"):
        VOCDetection(root, "missing", ("cat",))


def test_voc_reader_refuses_entities(tmp_path):
    path = tmp_path / "bomb.xml"
    path.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xxxx">]><annotation>&x;</annotation>')
    with pytest.raises(DatasetError, match="DTD"):
        parse_voc_xml(str(path), {"cat": 1})


def test_resize_follows_min_and_max_size():
    assert rescale_factor(375, 500, 600, 1000) == pytest.approx(1.6)
    assert rescale_factor(300, 1000, 600, 1000) == pytest.approx(1.0)  # the long side caps it
    image = torch.zeros(3, 375, 500, dtype=torch.uint8)
    out, boxes = resize(image, torch.tensor([[0.0, 0.0, 500.0, 375.0]]), 600, 1000)
    assert out.shape == (3, 600, 800)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 800.0, 600.0]]))


def test_hflip_mirrors_image_and_boxes():
    image = torch.zeros(3, 10, 20, dtype=torch.uint8)
    image[:, :, :5] = 255  # a white band on the left
    out, boxes = hflip(image, torch.tensor([[0.0, 0.0, 5.0, 10.0]]))
    assert bool((out[:, :, 15:] == 255).all()) and bool((out[:, :, :15] == 0).all())
    torch.testing.assert_close(boxes, torch.tensor([[15.0, 0.0, 20.0, 10.0]]))


def test_collate_pads_and_keeps_sizes():
    items = []
    for h, w in ((4, 6), (5, 3)):
        items.append(
            {
                "image": torch.ones(3, h, w),
                "boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.long),
                "difficult": torch.zeros(0, dtype=torch.bool),
                "original_boxes": torch.zeros(0, 4),
                "original_size": (h * 2, w * 2),
                "image_id": f"{h}",
            }
        )
    batch = collate(items)
    assert batch.images.shape == (2, 3, 5, 6)
    assert batch.image_sizes == [(4, 6), (5, 3)]
    assert float(batch.images[1, :, :, 3:].abs().sum()) == 0.0


def test_shapes_generator_is_deterministic_and_voc_like(tmp_path):
    a = render_image(np.random.default_rng([0, 1, 5]), SHAPE_CLASSES)
    b = render_image(np.random.default_rng([0, 1, 5]), SHAPE_CLASSES)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    # statistics over many images: 1 to 6 objects, sizes from ~16 px to most of the image, all classes
    counts, sides, classes, aspects = [], [], set(), []
    for i in range(60):
        image, objects = render_image(np.random.default_rng([1, 1, i]), SHAPE_CLASSES)
        counts.append(len(objects))
        for o in objects:
            x0, y0, x1, y1 = o["bbox"]
            w, h = x1 - x0 + 1, y1 - y0 + 1
            assert 1 <= x0 <= x1 <= image.shape[1] and 1 <= y0 <= y1 <= image.shape[0]
            sides.append((w * h) ** 0.5)
            aspects.append(h / w)
            classes.add(o["name"])
    assert min(counts) >= 0 and max(counts) <= 6 and np.mean(counts) > 2
    assert min(sides) < 24 and max(sides) > 180
    assert min(aspects) < 0.5 and max(aspects) > 2
    assert classes == set(SHAPE_CLASSES)


def test_generated_dataset_reads_back_through_the_voc_reader(tmp_path):
    params = dataset_params(num_train=3, num_val=2, num_test=1, seed=7)
    generate(str(tmp_path), params, progress=False)
    ds = VOCDetection(str(tmp_path), "trainval", SHAPE_CLASSES)
    assert len(ds) == 5
    item = ds[0]
    assert item["image"].shape[0] == 3 and item["boxes"].shape[1] == 4
    # same parameters, same folder; the folder is reused, not regenerated
    root = ensure_dataset(str(tmp_path / "d"), num_train=2, num_val=1, num_test=1)
    mtime = os.path.getmtime(os.path.join(root, "generator.json"))
    assert ensure_dataset(str(tmp_path / "d"), num_train=2, num_val=1, num_test=1) == root
    assert os.path.getmtime(os.path.join(root, "generator.json")) == mtime


def test_detection_dataset_resizes_and_normalises(tmp_path):
    root = write_voc(tmp_path, {"img0": [("cat", (11, 11, 30, 20), 0)]}, classes=("cat",))
    ds = DetectionDataset(VOCDetection(root, "trainval", ("cat",)), min_size=80, max_size=200, mean=(0.5,) * 3, std=(0.5,) * 3)
    item = ds[0]
    assert item["image"].shape == (3, 80, 100) and item["image"].dtype == torch.float32
    assert item["original_size"] == (40, 50)
    torch.testing.assert_close(item["boxes"], torch.tensor([[20.0, 20.0, 60.0, 40.0]]))
    torch.testing.assert_close(item["original_boxes"], torch.tensor([[10.0, 10.0, 30.0, 20.0]]))


class CountingReader(torch.utils.data.Dataset):
    """A reader that counts its reads, and can fail one index."""

    def __init__(self, voc, bad=None):
        self.voc, self.bad, self.reads = voc, bad, []

    def __len__(self):
        return len(self.voc)

    def __getitem__(self, index):
        self.reads.append(index)
        if index == self.bad:
            raise DatasetError("broken sample", kind="unreadable_image")
        return self.voc[index]


def test_sample_cache_reads_each_file_once_and_gives_out_copies(tmp_path):
    images = {f"img{i}": [("cat", (11, 11, 30, 20), 0)] for i in range(3)}
    voc = VOCDetection(write_voc(tmp_path, images, classes=("cat",)), "trainval", ("cat",))
    plain = DetectionDataset(voc, min_size=80, max_size=200, mean=(0.5,) * 3, std=(0.5,) * 3)
    reader = CountingReader(voc)
    cached = DetectionDataset(reader, min_size=80, max_size=200, mean=(0.5,) * 3, std=(0.5,) * 3, cache_mb=1)
    for _ in range(3):
        for i in range(3):
            a, b = plain[i], cached[i]
            torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
            torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=0)
            assert a["image_id"] == b["image_id"]
    assert reader.reads == [0, 1, 2]  # the files once; then the cache
    # what a caller (an augmentation) does to a sample never reaches the cache
    first, _ = cached._read(0)
    first["image"].zero_()
    first["boxes"].add_(5)
    again, _ = cached._read(0)
    torch.testing.assert_close(again["image"], voc[0]["image"], rtol=0, atol=0)
    torch.testing.assert_close(again["boxes"], voc[0]["boxes"], rtol=0, atol=0)
    assert cached.cache.bytes == sum(cached.cache._size(voc[i]) for i in range(3))


def test_sample_cache_stops_at_its_size_and_never_keeps_a_bad_sample(tmp_path):
    images = {f"img{i}": [("cat", (11, 11, 30, 20), 0)] for i in range(4)}
    voc = VOCDetection(write_voc(tmp_path, images, classes=("cat",)), "trainval", ("cat",))
    one = SampleCache(0)._size(voc[0])  # every sample has the same size here
    cache = SampleCache(2 * one + one // 2)  # room for two
    reader = CountingReader(voc, bad=3)
    for _ in range(2):
        for i in range(3):
            torch.testing.assert_close(cache.read(i, reader.__getitem__)["image"], voc[i]["image"], rtol=0, atol=0)
    assert sorted(cache.samples) == [0, 1] and cache.bytes == 2 * one
    assert reader.reads == [0, 1, 2, 2]  # the third did not fit: read from the file each time
    with pytest.raises(DatasetError):
        cache.read(3, reader.__getitem__)
    assert 3 not in cache.samples
    # under on_bad_sample=skip the next good sample is returned, and the bad one is not cached
    ds = DetectionDataset(CountingReader(voc, bad=3), min_size=80, max_size=200, mean=(0.5,) * 3, std=(0.5,) * 3, on_bad_sample="skip", cache_mb=1)
    item = ds[3]
    assert item["image_id"] == "img0" and len(item["skipped"]) == 1
    assert sorted(ds.cache.samples) == [0]
    for bad in (-1, "lots", True):
        with pytest.raises(ValueError, match="cache_mb"):
            DetectionDataset(voc, min_size=80, max_size=200, mean=(0.5,) * 3, std=(0.5,) * 3, cache_mb=bad)


def test_parallel_generation_writes_the_same_files(tmp_path):
    params = dataset_params(num_train=5, num_val=2, num_test=1, seed=3)
    generate(str(tmp_path / "one"), params, progress=False, workers=1)
    generate(str(tmp_path / "two"), params, progress=False, workers=2)
    for sub in ("JPEGImages/000006.jpg", "Annotations/000003.xml", "ImageSets/Main/trainval.txt", "ImageSets/Main/test.txt"):
        assert (tmp_path / "one" / sub).read_bytes() == (tmp_path / "two" / sub).read_bytes()
    assert (tmp_path / "one" / "ImageSets/Main/test.txt").read_text() == "000007\n"


def test_batch_moves_field_by_field():
    item = {
        "image": torch.ones(3, 4, 6),
        "boxes": torch.zeros(1, 4),
        "labels": torch.ones(1, dtype=torch.long),
        "difficult": torch.zeros(1, dtype=torch.bool),
        "original_boxes": torch.zeros(1, 4),
        "original_size": (8, 12),
        "image_id": "a",
    }
    batch = collate([item])
    assert batch.to("cpu") is batch
    moved = batch.to("meta")
    assert moved.images.device.type == "meta" and moved.boxes[0].device.type == "meta" and moved.labels[0].device.type == "meta"
    assert moved.image_sizes == [(4, 6)] and moved.original_sizes == [(8, 12)] and moved.image_ids == ["a"]
