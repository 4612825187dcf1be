import math

import torch

from fasterrcnn.anchors import AnchorGenerator, anchor_base, grid_anchors
from fasterrcnn.boxes import BoxCoder, boxes_to_voc, hflip_boxes, voc_to_boxes


def test_anchor_base_matches_hand_computed_values():
    # scale 2 x base 4 = 8 px; ratio 0.5 -> h = 8 * sqrt(.5), w = 8 / sqrt(.5)
    base = anchor_base(4, scales=[1, 2], ratios=[0.5, 1.0])
    h, w = 8 * math.sqrt(0.5), 8 / math.sqrt(0.5)
    expected = torch.tensor(
        [
            [-w / 4, -h / 4, w / 4, h / 4],  # ratio 0.5, scale 1 (ratios-major order)
            [-w / 2, -h / 2, w / 2, h / 2],  # ratio 0.5, scale 2
            [-2, -2, 2, 2],  # ratio 1, scale 1
            [-4, -4, 4, 4],  # ratio 1, scale 2
        ]
    )
    torch.testing.assert_close(base, expected)


def test_k9_areas_and_ratios_are_the_papers():
    base = anchor_base(16, scales=[8, 16, 32], ratios=[0.5, 1, 2])
    w = base[:, 2] - base[:, 0]
    h = base[:, 3] - base[:, 1]
    torch.testing.assert_close((w * h).sqrt(), torch.tensor([128.0, 256, 512] * 3))
    torch.testing.assert_close(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3))


def test_grid_anchors_centres_and_order():
    base = anchor_base(16, scales=[1], ratios=[1.0, 2.0])  # A = 2
    anchors = grid_anchors(base, height=2, width=3, stride=16)
    assert anchors.shape == (2 * 3 * 2, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    # location-major: (row 0, col 0) x 2 anchors, then (row 0, col 1), ...
    torch.testing.assert_close(centres[0], torch.tensor([8.0, 8.0]))
    torch.testing.assert_close(centres[1], torch.tensor([8.0, 8.0]))
    torch.testing.assert_close(centres[2], torch.tensor([24.0, 8.0]))
    torch.testing.assert_close(centres[6], torch.tensor([8.0, 24.0]))
    # base_size 16, stride 16: the reference's first anchor of scale 1, ratio 1 is (0, 0, 16, 16)
    torch.testing.assert_close(anchors[0], torch.tensor([0.0, 0.0, 16.0, 16.0]))


def test_anchor_generator_k_and_cache():
    gen = AnchorGenerator(scales=[8, 16, 32], ratios=[0.5, 1, 2], stride=16)
    assert gen.num_anchors == 9
    a = gen(3, 4)
    assert a.shape == (3 * 4 * 9, 4)
    assert gen(3, 4) is a


def test_encode_decode_round_trip():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(50, 2, generator=g) * 100
    ref = torch.cat((ref, ref + 5 + torch.rand(50, 2, generator=g) * 80), dim=1)
    boxes = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat((boxes, boxes + 5 + torch.rand(50, 2, generator=g) * 80), dim=1)
    for coder in (BoxCoder(), BoxCoder(std=(0.1, 0.1, 0.2, 0.2)), BoxCoder(mean=(0.1, -0.2, 0.0, 0.3), std=(0.5, 0.5, 1, 1))):
        torch.testing.assert_close(coder.decode(ref, coder.encode(ref, boxes)), boxes, rtol=1e-4, atol=1e-3)


def test_encode_is_the_papers_parametrisation():
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    gt = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14), w 20, h 20
    expected = torch.tensor([[7 / 10, 4 / 20, math.log(2.0), 0.0]])
    torch.testing.assert_close(BoxCoder().encode(ref, gt), expected)
    torch.testing.assert_close(BoxCoder(std=(0.1, 0.1, 0.2, 0.2)).encode(ref, gt), expected / torch.tensor([0.1, 0.1, 0.2, 0.2]))


def test_decode_broadcasts_class_specific_deltas():
    rois = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 25.0, 15.0]])
    deltas = torch.zeros(2, 3, 4)
    boxes = BoxCoder(std=(0.1, 0.1, 0.2, 0.2)).decode(rois[:, None], deltas)
    assert boxes.shape == (2, 3, 4)
    torch.testing.assert_close(boxes[:, 2], rois)


def test_voc_conversion_and_flip():
    voc = torch.tensor([[1.0, 1.0, 10.0, 20.0]])
    boxes = voc_to_boxes(voc)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 10.0, 20.0]]))
    # the devkit's +1 width of a box covering pixels 1..10 is 10
    assert float(boxes[0, 2] - boxes[0, 0]) == 10.0
    torch.testing.assert_close(boxes_to_voc(boxes), voc)
    torch.testing.assert_close(hflip_boxes(boxes, width=30), torch.tensor([[20.0, 0.0, 30.0, 20.0]]))
