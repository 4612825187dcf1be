"""The augmentation (fasterrcnn.data.augment, conf/augment/), the multi-scale sizes, the shifted
split of the built-in data and scripts/show_augment.py.

The box checks paint two coloured rectangles on a grey texture, augment, and find each colour
again: the box that carries its label must cover it (IoU >= 0.95 after rounding).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.ops import box_iou

from fasterrcnn.build import UnsafeConfigError
from fasterrcnn.data import VOCDetection
from fasterrcnn.data.augment import Augment, build_augment, draw_min_size, eval_min_size, item_generator
from fasterrcnn.data.shapes import SHAPE_CLASSES, SHIFT_SPLIT, dataset_params, ensure_dataset, params_hash
from fasterrcnn.data.transforms import Preprocess, prepare
from fasterrcnn.visual_augment import compose_config as compose_with_augment

from .conftest import SMALL_DATA

ROOT = Path(__file__).resolve().parents[1]


def augment_config(*overrides: str):
    """The training config with ``overrides`` (``augment=strong``...): its ``augment`` node."""
    return compose_with_augment(list(overrides), output_dir=str(ROOT / "outputs" / "unused")).augment

# label -> (colour, box x1 y1 x2 y2); label 2 is difficult
RECTS = {1: ((255, 0, 255), (40, 30, 130, 100)), 2: ((0, 255, 255), (150, 110, 240, 180))}


def scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 200 x 260 grey texture (R = G = B up to small noise) with a magenta and a cyan rectangle."""
    g = torch.Generator().manual_seed(0)
    texture = TF.resize(torch.rand(1, 20, 26, generator=g) * 120 + 60, [200, 260], antialias=True)
    image = (texture + torch.randint(-8, 9, (3, 200, 260), generator=g)).clamp(0, 255).to(torch.uint8)
    for colour, (x1, y1, x2, y2) in RECTS.values():
        image[:, y1:y2, x1:x2] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    boxes = torch.tensor([box for _, box in RECTS.values()], dtype=torch.float32)
    return image, boxes, torch.tensor(list(RECTS)), torch.tensor([False, True])


def colour_box(image: torch.Tensor, label: int) -> torch.Tensor | None:
    """The bounding box (continuous coordinates) of the pixels of ``label``'s colour, None if none."""
    r, g, b = image.int().unbind(0)
    mask = ((r - g > 100) & (b - g > 100)) if label == 1 else ((g - r > 100) & (b - r > 100))
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if xs.numel() == 0:
        return None
    return torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)


def no_hflip(**kwargs) -> Augment:
    return Augment(hflip=0.0, **kwargs)


TRANSFORMS = {
    "hflip": lambda: Augment(hflip=1.0),
    "vflip": lambda: no_hflip(vflip=1.0),
    "rot90": lambda: no_hflip(rot90=True),
    "colour": lambda: no_hflip(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.02),
    "blur": lambda: no_hflip(blur=1.0, blur_sigma=(0.5, 1.5)),
    "noise": lambda: no_hflip(noise=1.0, noise_sigma=0.03),
    "noise_range": lambda: no_hflip(noise=1.0, noise_sigma=(0.01, 0.1)),
    "stretch": lambda: no_hflip(stretch=(0.5, 2.0)),
    "scale_jitter": lambda: no_hflip(scale_jitter=(0.75, 1.25), translate=0.1),
    "zoom_out": lambda: no_hflip(zoom_out=1.0, zoom_out_max=2.0),
    "iou_crop": lambda: no_hflip(iou_crop=1.0),
    "strong+vflip+rot90": lambda: build_augment(augment_config("augment=strong", "augment.vflip=0.5", "augment.rot90=true")),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_each_transform_keeps_boxes_on_the_object(name):
    augment = TRANSFORMS[name]()
    image, boxes, labels, difficult = scene()
    checked = 0
    for index in range(8):
        out, out_boxes, out_labels, out_difficult = augment(image, boxes, labels, difficult, item_generator(0, 0, index))
        assert out.dtype == torch.uint8 and out.shape[0] == 3 and out_boxes.dtype == torch.float32
        assert len(out_boxes) == len(out_labels) == len(out_difficult)
        for box, label, flag in zip(out_boxes, out_labels.tolist(), out_difficult.tolist()):
            assert flag == (label == 2)  # the difficult flag follows its box
            found = colour_box(out, label)
            assert found is not None, f"{name}: box of label {label} kept, its colour gone"
            if min(box[2] - box[0], box[3] - box[1]) >= 20:  # a cut sliver has no meaningful IoU
                assert float(box_iou(box[None].round(), found)) >= 0.95, f"{name} draw {index}: {box.tolist()} vs {found.tolist()}"
                checked += 1
    assert checked >= 8
    if name in ("hflip", "vflip", "rot90", "colour", "blur", "noise", "noise_range", "stretch", "zoom_out"):  # none of these cut a box
        assert not augment.cuts_boxes


def test_an_image_without_boxes_goes_through_every_transform():
    augment = Augment(hflip=0.5, vflip=0.5, rot90=True, brightness=0.2, blur=0.5, noise=0.5, scale_jitter=(0.7, 1.3), translate=0.1, zoom_out=0.5, iou_crop=0.5)
    image = scene()[0]
    for index in range(12):
        out, boxes, labels, difficult = augment(image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), item_generator(0, 0, index))
        assert out.dtype == torch.uint8 and boxes.shape == (0, 4) and labels.numel() == difficult.numel() == 0


def test_rot90_draws_every_quarter_turn():
    augment = no_hflip(rot90=True)
    image, boxes, labels, difficult = scene()
    shapes = {tuple(augment(image, boxes, labels, difficult, item_generator(0, 0, i))[0].shape) for i in range(24)}
    assert shapes == {(3, 200, 260), (3, 260, 200)}


def test_stretch_changes_the_aspect_ratio_within_its_range_and_keeps_the_area():
    augment = no_hflip(stretch=(0.5, 2.0))
    image, boxes, labels, difficult = scene()
    factors = []
    for i in range(40):
        out, out_boxes = augment(image, boxes, labels, difficult, item_generator(0, 0, i))[:2]
        height, width = out.shape[-2:]
        assert abs(height * width / (200 * 260) - 1) < 0.02  # the area about kept
        factor = (height / width) / (200 / 260)
        assert 0.5 * 0.98 <= factor <= 2.0 * 1.02
        w, h = (out_boxes[:, 2] - out_boxes[:, 0]), (out_boxes[:, 3] - out_boxes[:, 1])
        torch.testing.assert_close(h / w, (boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0]) * factor, rtol=0.02, atol=0)
        factors.append(factor)
    assert min(factors) < 0.7 and max(factors) > 1.4  # both ways, most of the range


def test_noise_range_draws_a_strength_per_image():
    augment = no_hflip(noise=1.0, noise_sigma=(0.0, 0.1))
    flat = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    stds = [float((augment(flat, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), item_generator(0, 0, i))[0].float() - 128).std()) / 255 for i in range(24)]
    assert all(s <= 0.1 * 1.1 for s in stds) and min(stds) < 0.03 and max(stds) > 0.07


# ---------------------------------------------------------------------- draws
def strong() -> Augment:
    return build_augment(augment_config("augment=strong", "augment.rot90=true", "augment.vflip=0.5"))


def test_draws_are_fixed_by_seed_epoch_and_index():
    augment = strong()
    image, boxes, labels, difficult = scene()
    a = augment(image, boxes, labels, difficult, item_generator(3, 1, 7))
    torch.rand(5)  # whatever the global generator does in between
    b = augment(image, boxes, labels, difficult, item_generator(3, 1, 7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    outs = [augment(image, boxes, labels, difficult, item_generator(*key))[0] for key in [(3, 1, 8), (3, 2, 7), (4, 1, 7)]]
    assert all(not (o.shape == a[0].shape and torch.equal(o, a[0])) for o in outs)


def test_a_passed_generator_leaves_the_global_one_alone():
    augment = strong()
    image, boxes, labels, difficult = scene()
    state = torch.get_rng_state()
    augment(image, boxes, labels, difficult, item_generator(0, 0, 0))
    assert torch.equal(torch.get_rng_state(), state)


def test_item_generator_streams_differ():
    firsts = {float(torch.rand((), generator=item_generator(*key))) for key in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1)]}
    assert len(firsts) == 5
    assert torch.equal(torch.rand(4, generator=item_generator(2, 3, 4)), torch.rand(4, generator=item_generator(2, 3, 4)))
    with pytest.raises(ValueError):
        item_generator(0, -1, 0)


class Augmented(Dataset):
    """Image ``index`` of the scene under ``augment`` with the (seed, epoch, index) stream."""

    def __init__(self, augment: Augment, epoch: int) -> None:
        self.augment, self.epoch = augment, epoch
        self.sample = scene()

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return self.augment(*self.sample, generator=item_generator(0, self.epoch, index))


def test_dataloader_workers_draw_what_the_main_process_draws():
    dataset = Augmented(strong(), epoch=2)
    main = list(DataLoader(dataset, batch_size=None, num_workers=0))
    workers = list(DataLoader(dataset, batch_size=None, num_workers=2))
    for a, b in zip(main, workers):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------- the paper's flip
def test_paper_draws_exactly_the_reference_flip():
    """augment=paper with no generator: one torch.rand per image from the global generator,
    flipping when it is below 0.5, as DetectionDataset has drawn ``torch.rand(()) < flip_prob``;
    the result, rescaled by prepare, is the reference's flip after rescaling."""
    augment = build_augment(augment_config("augment=paper"))
    assert augment.rng == "global" and not augment.cuts_boxes
    image, boxes, labels, difficult = scene()
    spec = Preprocess(min_size=150, max_size=400)
    torch.manual_seed(123)
    ours = []
    for _ in range(16):
        out, out_boxes, out_labels, out_difficult = augment(image, boxes, labels, difficult)
        assert torch.equal(out_labels, labels) and torch.equal(out_difficult, difficult)
        ours.append((torch.equal(out, image.flip(-1)), *prepare(out, out_boxes, spec)))
    state_ours = torch.get_rng_state()
    torch.manual_seed(123)
    reference = []
    for _ in range(16):
        flip = bool(torch.rand(()) < 0.5)
        reference.append((flip, *prepare(image, boxes, spec, flip=flip)))
    assert torch.equal(torch.get_rng_state(), state_ours)  # the same number of draws
    assert [f for f, _, _ in ours] == [f for f, _, _ in reference] and 0 < sum(f for f, _, _ in ours) < 16
    for (_, img_a, box_a), (_, img_b, box_b) in zip(ours, reference):
        assert torch.equal(img_a, img_b)  # flip-then-resize gives the same pixels here
        torch.testing.assert_close(box_a, box_b, atol=1e-4, rtol=0)  # ...and boxes up to float rounding
    # flip off: no draw at all, as before
    state = torch.get_rng_state()
    Augment(hflip=0.0)(image, boxes, labels, difficult)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------- box dropping
def test_boxes_pushed_out_are_dropped_with_their_labels_and_flags():
    image = torch.full((3, 100, 200), 128, dtype=torch.uint8)
    boxes = torch.tensor(
        [
            [0.0, 40.0, 30.0, 60.0],  # 1: pushed out on the left
            [170.0, 40.0, 200.0, 60.0],  # 2: pushed out on the right (difficult)
            [90.0, 40.0, 110.0, 60.0],  # 3: in the centre, kept
            [44.0, 40.0, 50.6, 60.0],  # 4: cut to a sliver 1.2 px wide: under min_box_size
            [40.0, 40.0, 70.0, 60.0],  # 5: cut, 40 px wide remain
        ]
    )
    labels, difficult = torch.arange(1, 6), torch.tensor([False, True, False, False, True])
    zoom_in = no_hflip(scale_jitter=(2.0, 2.0), min_box_size=2.0)  # 2x about the centre: x' = 2x - 100
    out, out_boxes, out_labels, out_difficult = zoom_in(image, boxes, labels, difficult, item_generator(0, 0, 0))
    assert out.shape == image.shape
    assert out_labels.tolist() == [3, 5] and out_difficult.tolist() == [False, True]
    torch.testing.assert_close(out_boxes, torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 30.0, 40.0, 70.0]]), atol=1.0, rtol=0)
    # without a transform that cuts, nothing is dropped, even a box under min_box_size
    tiny = torch.tensor([[10.0, 10.0, 11.5, 11.5]])
    kept = Augment(hflip=1.0, vflip=1.0, rot90=True, zoom_out=1.0, min_box_size=2.0)(image, tiny, labels[:1], difficult[:1], item_generator(0, 0, 0))
    assert len(kept[1]) == 1 and kept[2].tolist() == [1]


def test_iou_crop_keeps_only_whole_enough_boxes():
    augment = no_hflip(iou_crop=1.0, min_box_size=3.0)
    image, boxes, labels, difficult = scene()
    dropped = 0
    for index in range(30):
        out, out_boxes, out_labels, out_difficult = augment(image, boxes, labels, difficult, item_generator(0, 0, index))
        height, width = out.shape[-2:]
        assert len(out_boxes) >= 1  # the IoU crop keeps the centre of some box
        assert bool(((out_boxes[:, 2:] - out_boxes[:, :2]) >= 3.0).all())
        assert bool((out_boxes[:, 0::2] <= width).all() and (out_boxes[:, 1::2] <= height).all() and (out_boxes >= 0).all())
        assert out_difficult.tolist() == [label == 2 for label in out_labels.tolist()]
        dropped += 2 - len(out_boxes)
    assert dropped > 0


def _random_crop_case(generator: torch.Generator, case: int):
    """An image size and 0-14 boxes (some degenerate, some at the border) for the IoU crop."""
    h, w = (int(v) for v in torch.randint(8, 400, (2,), generator=generator))
    k = int(torch.randint(0, 15, (1,), generator=generator)) if case % 4 else int(torch.randint(1, 3, (1,), generator=generator))
    size = torch.tensor([w, h]).float()
    xy = torch.rand(k, 2, generator=generator) * size
    wh = torch.rand(k, 2, generator=generator) * size * (0.05 if case % 3 == 0 else 0.7)
    if case % 7 == 0 and k:
        wh[0] = 0.0  # a zero-area box
    boxes = torch.cat([xy, (xy + wh).minimum(size)], 1)
    return tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)), tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))


def test_iou_crop_is_v2s_crop_with_v2s_draws():
    """IoUCrop tests all of an option's trials at once: the same crop (or none) as
    v2.RandomIoUCrop, and the global generator left exactly where v2's loop leaves it."""
    from torchvision.transforms import v2

    from fasterrcnn.data.augment import IoUCrop

    generator = torch.Generator().manual_seed(0)
    theirs, ours = v2.RandomIoUCrop(), IoUCrop()
    cropped = 0
    for case in range(400):
        image, boxes = _random_crop_case(generator, case)
        if boxes.shape[0] == 0 and case % 5:
            continue  # v2 redraws options until "no crop": slow, keep a few
        results = []
        for transform in (theirs, ours):
            torch.manual_seed(case)
            params = transform.make_params([image, boxes])
            results.append((params, torch.get_rng_state(), torch.rand(())))
        (p_theirs, state_theirs, next_theirs), (p_ours, state_ours, next_ours) = results
        assert torch.equal(state_theirs, state_ours) and next_theirs == next_ours, case
        assert p_theirs.keys() == p_ours.keys(), case
        for key, value in p_theirs.items():
            assert torch.equal(value, p_ours[key]) if isinstance(value, torch.Tensor) else value == p_ours[key], (case, key)
        cropped += bool(p_ours)
    assert cropped > 100
    # the whole transform: the same image and boxes
    image, boxes = _random_crop_case(torch.Generator().manual_seed(1), 1)
    image = tv_tensors.Image(torch.randint(0, 256, image.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(2)))
    for seed in range(20):
        outs = []
        for transform in (theirs, ours):
            torch.manual_seed(seed)
            outs.append(transform(image, boxes))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_augment_builds_the_fast_iou_crop():
    from fasterrcnn.data.augment import IoUCrop

    transforms = no_hflip(iou_crop=0.3).transforms.transforms
    assert [type(t.transforms[0]) for t in transforms if hasattr(t, "transforms")] == [IoUCrop]


def test_bad_parameters_are_refused():
    for kwargs in ({"hflip": 1.5}, {"rng": "numpy"}, {"min_box_size": 0.5}, {"scale_jitter": (1.2, 0.8)}, {"zoom_out": 0.5, "zoom_out_max": 0.9}, {"hue": 0.7},
                   {"stretch": (2.0, 0.5)}, {"stretch": (0.0, 2.0)}, {"noise": 0.5, "noise_sigma": (0.1, 0.05)}, {"noise": 0.5, "noise_sigma": (0.0, 1.5)}):
        with pytest.raises(ValueError):
            Augment(**kwargs)
    with pytest.raises(UnsafeConfigError):
        build_augment({"_target_": "builtins.open", "file": "x"})


def test_every_choice_builds_and_takes_the_overhead_options():
    for choice in ("paper", "light", "strong", "robust"):
        augment = build_augment(augment_config(f"augment={choice}", "augment.vflip=0.5", "augment.rot90=true"))
        names = repr(augment.transforms)
        assert "RandomHorizontalFlip(p=0.5)" in names and "RandomVerticalFlip(p=0.5)" in names and "RandomRotation" in names
        assert ("ColorJitter" in names) == (choice != "paper") and ("IoUCrop(" in names) == (choice in ("strong", "robust"))
        assert ("RandomStretch" in names) == ("RandomNoise" in names) == (choice == "robust")
    assert build_augment(augment_config("augment=light")).rng == "item"


# ---------------------------------------------------------------------- multi-scale
def test_multi_scale_sizes():
    sizes = [224, 256, 288]
    g = torch.Generator().manual_seed(0)
    draws = [draw_min_size(sizes, g) for _ in range(200)]
    assert set(draws) == set(sizes) and min(draws.count(s) for s in sizes) > 40
    assert [draw_min_size(sizes, item_generator(0, 1, i)) for i in range(10)] == [draw_min_size(sizes, item_generator(0, 1, i)) for i in range(10)]
    state = torch.get_rng_state()
    assert draw_min_size(600) == 600 and draw_min_size([600]) == 600
    assert torch.equal(torch.get_rng_state(), state)  # one size: no draw
    assert eval_min_size(sizes) == 288 and eval_min_size(600) == 600 and eval_min_size(sizes, 240) == 240
    for bad in ([], [0, 256], -1):
        with pytest.raises(ValueError):
            draw_min_size(bad)


# ---------------------------------------------------------------------- the shifted split
def _digests(root: str, ids: list[str]) -> dict[str, str]:
    out = {}
    for i in ids:
        for sub in (f"JPEGImages/{i}.jpg", f"Annotations/{i}.xml"):
            out[sub] = hashlib.sha256(open(os.path.join(root, sub), "rb").read()).hexdigest()
    return out


def _statistics(root: str, split: str) -> dict[str, float]:
    """Mean background value (pixels outside every box), median box side, fraction of boxes
    with an aspect ratio beyond 2.5:1."""
    background, sides, elongated = [], [], []
    voc = VOCDetection(root, split, SHAPE_CLASSES)
    for k in range(len(voc)):
        item = voc[k]
        outside = torch.ones(item["image"].shape[-2:], dtype=torch.bool)
        for x1, y1, x2, y2 in item["boxes"].round().long().tolist():
            outside[y1:y2, x1:x2] = False
            w, h = x2 - x1, y2 - y1
            sides.append((w * h) ** 0.5)
            elongated.append(max(w / h, h / w) > 2.5)
        background.append(float(item["image"].float().mean(0)[outside].mean()))
    return {"background": float(np.mean(background)), "side": float(np.median(sides)), "elongated": float(np.mean(elongated))}


def test_shifted_split_leaves_the_other_splits_alone_and_differs(tmp_path):
    assert "num_test_shift" not in dataset_params() and params_hash(dataset_params()) == "bfb76bc928"  # the default folder name
    plain = ensure_dataset(str(tmp_path), num_train=10, num_val=2, num_test=2, progress=False)
    shifted = ensure_dataset(str(tmp_path), num_train=10, num_val=2, num_test=2, num_test_shift=10, progress=False)
    assert plain != shifted
    main = os.path.join("ImageSets", "Main")
    for split in ("train", "val", "test", "trainval"):
        assert open(os.path.join(plain, main, f"{split}.txt")).read() == open(os.path.join(shifted, main, f"{split}.txt")).read()
    ids = [f"{i:06d}" for i in range(14)]
    assert _digests(plain, ids) == _digests(shifted, ids)  # byte-identical train, val and test
    assert not os.path.exists(os.path.join(plain, main, f"{SHIFT_SPLIT}.txt"))
    assert open(os.path.join(shifted, main, f"{SHIFT_SPLIT}.txt")).read().split() == [f"{i:06d}" for i in range(14, 24)]
    train, shift = _statistics(shifted, "train"), _statistics(shifted, SHIFT_SPLIT)
    assert shift["background"] < 0.7 * train["background"]
    assert shift["side"] < 0.7 * train["side"]
    assert shift["elongated"] > train["elongated"] + 0.1


# ---------------------------------------------------------------------- the script
def test_show_augment_writes_a_png(tmp_path, data_dir):
    spec = importlib.util.spec_from_file_location("script_show_augment", ROOT / "scripts" / "show_augment.py")
    show_augment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(show_augment)
    out = tmp_path / "grid.png"
    overrides = [f"paths.data_dir={data_dir}", *SMALL_DATA, "augment=strong", "data.min_size=[192,224]"]
    path = show_augment.main(["--num", "5", "--index", "1", "--columns", "3", "--out", str(out), *overrides])
    assert path == str(out)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 3 * 192 and png.size[1] > 2 * 192


def test_blur_is_v2s_gaussian_blur_done_one_axis_at_a_time():
    from fasterrcnn.data.augment import RandomBlur

    image = scene()[0]
    for sigma in (0.4, 1.3, 2.5):
        taps = 2 * int(np.ceil(3 * sigma)) + 1
        ours = RandomBlur((sigma, sigma))(tv_image(image))
        theirs = TF.gaussian_blur(image, [taps, taps], [sigma, sigma])
        assert ours.dtype == torch.uint8 and (ours.int() - theirs.int()).abs().max() <= 1, sigma
        assert (ours.int() - image.int()).abs().max() > 10  # it does blur


def test_one_axis_blur_is_torchvisions_one_row_kernel():
    from fasterrcnn.data.augment import gaussian_blur_axis

    image = torch.rand(2, 3, 23, 31) * 255
    for sigma, taps in ((0.7, 5), (2.5, 17)):
        for dim, size in ((-2, [1, taps]), (-1, [taps, 1])):  # TF's kernel_size is [width, height]
            theirs = TF.gaussian_blur(image, size, [sigma, sigma])
            assert torch.allclose(gaussian_blur_axis(image, sigma, taps, dim), theirs, atol=1e-3), (sigma, dim)


def tv_image(image: torch.Tensor):
    from torchvision import tv_tensors

    return tv_tensors.Image(image)


# ---------------------------------------------------------------------- mosaic
def _piece(colour: tuple[int, int, int], box: tuple[int, int, int, int], size: tuple[int, int], label: int, difficult: bool):
    """A grey ``size`` image with one rectangle of ``colour`` at ``box``, and its annotation."""
    image = torch.full((3, *size), 128, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    return image, torch.tensor([box], dtype=torch.float32), torch.tensor([label]), torch.tensor([difficult])


MOSAIC_PIECES = [  # colour, box, image size (H, W), label, difficult: four different shapes
    ((255, 0, 0), (20, 30, 120, 90), (200, 260), 1, False),
    ((0, 255, 0), (50, 10, 90, 150), (240, 160), 2, True),
    ((0, 0, 255), (100, 60, 250, 140), (160, 300), 3, False),
    ((255, 255, 0), (10, 10, 190, 190), (200, 200), 4, False),
]


def _find(image: torch.Tensor, colour: tuple[int, int, int]) -> torch.Tensor:
    """The box of the pixels within 60 of ``colour`` in every channel."""
    close = (image.int() - torch.tensor(colour)[:, None, None]).abs().max(0).values < 60
    ys, xs = torch.nonzero(close, as_tuple=True)
    return torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)


@pytest.mark.parametrize("centre", [(0.5, 0.5), (0.25, 0.7), (0.75, 0.3)])
def test_mosaic_tiles_four_images_with_their_boxes(centre):
    from fasterrcnn.data.augment import mosaic

    pieces = [_piece(*p) for p in MOSAIC_PIECES]
    image, boxes, labels, difficult = mosaic(pieces, centre)
    assert image.dtype == torch.uint8 and image.shape == (3, 200, 260)  # the first piece's canvas
    assert labels.tolist() == [1, 2, 3, 4] and difficult.tolist() == [False, True, False, False]
    cx, cy = round(centre[0] * 260), round(centre[1] * 200)
    quadrants = [(0, 0, cx, cy), (cx, 0, 260, cy), (0, cy, cx, 200), (cx, cy, 260, 200)]
    for (colour, *_), box, (x0, y0, x1, y1) in zip(MOSAIC_PIECES, boxes, quadrants):
        assert x0 - 1e-4 <= box[0] and box[2] <= x1 + 1e-4 and y0 - 1e-4 <= box[1] and box[3] <= y1 + 1e-4  # inside its quadrant
        # a tile shrunk to a few pixels blurs its edges (antialiasing): a looser bound there
        bound = 0.95 if min(box[2] - box[0], box[3] - box[1]) >= 20 else 0.8
        assert float(box_iou(box[None].round(), _find(image, colour))) >= bound
    # each tile keeps its aspect ratio and touches the centre
    for (_, box, (h, w), *_), out in zip(MOSAIC_PIECES, boxes):
        scale_x, scale_y = (out[2] - out[0]) / (box[2] - box[0]), (out[3] - out[1]) / (box[3] - box[1])
        assert abs(scale_x / scale_y - 1) < 0.05


def test_mosaic_of_images_without_boxes_and_bad_input():
    from fasterrcnn.data.augment import mosaic

    empty = (torch.zeros(3, 50, 60, dtype=torch.uint8), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    image, boxes, labels, difficult = mosaic([empty] * 4, (0.5, 0.5))
    assert image.shape == (3, 50, 60) and boxes.shape == (0, 4) and labels.numel() == difficult.numel() == 0
    with pytest.raises(ValueError, match="4 pieces"):
        mosaic([empty] * 3, (0.5, 0.5))
    with pytest.raises(ValueError, match="mosaic"):
        Augment(mosaic=1.5)


def test_mosaic_draws_partners_from_the_item_stream_and_nothing_when_off():
    on, off = Augment(hflip=0.0, mosaic=1.0, rng="item"), Augment(hflip=0.0, rng="item")
    first = on.draw_mosaic(100, item_generator(0, 3, 5))
    assert first == on.draw_mosaic(100, item_generator(0, 3, 5)) and len(first) == 3 and all(0 <= i < 100 for i in first)
    assert len({tuple(on.draw_mosaic(100, item_generator(0, e, 5))) for e in range(6)}) > 1
    generator = item_generator(0, 0, 0)
    state = generator.get_state()
    assert off.draw_mosaic(100, generator) is None and torch.equal(generator.get_state(), state)  # no draw at all
    drawn = [Augment(hflip=0.0, mosaic=0.3, rng="item").draw_mosaic(10, item_generator(0, 0, i)) is not None for i in range(400)]
    assert 0.2 < sum(drawn) / 400 < 0.4


def test_training_dataset_makes_mosaics_with_boxes_on_their_objects(data_dir):
    """augment.mosaic=1 on the built-in data: every training item is a mosaic of four images
    (about four times the objects), the same for the same (epoch, index), and each box still
    lies on an object of its class's hue."""
    from fasterrcnn import build

    cfg = compose_with_augment([f"paths.data_dir={data_dir}", *SMALL_DATA, "augment=paper", "augment.mosaic=1.0", "augment.rng=item", "augment.hflip=0"], str(ROOT / "outputs" / "unused"))
    datamodule = build.build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    plain = build.build_datamodule(compose_with_augment([f"paths.data_dir={data_dir}", *SMALL_DATA, "augment=paper", "augment.hflip=0"], str(ROOT / "outputs" / "unused")))
    plain.prepare_data()
    plain.setup("fit")
    tiled, single = datamodule._dataset("train"), plain._dataset("train")
    n = min(len(tiled), 12)
    counts = [len(tiled.augmented(0, i)["boxes"]) for i in range(n)]
    singles = [len(single.augmented(0, i)["boxes"]) for i in range(n)]
    assert sum(counts) > 2.5 * sum(singles)
    a, b = tiled.augmented(2, 3), tiled.augmented(2, 3)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    assert a["image"].shape == single.augmented(2, 3)["image"].shape  # the canvas is the image's own size
    item = tiled[(2, 3)]
    assert item["image"].dtype == torch.float32 and len(item["boxes"]) == len(a["boxes"])
