import math

import torch
import torch.nn.functional as F

from fasterrcnn.losses import classification_loss, focal_cross_entropy, localisation_loss, select_class_deltas, smooth_l1


def test_smooth_l1_sigma():
    x = torch.tensor([0.05, 0.5, -2.0])
    sigma = 3.0
    # quadratic below 1/sigma^2 = 0.111..., linear above
    expected = torch.tensor([0.5 * 9 * 0.05**2, 0.5 - 0.5 / 9, 2.0 - 0.5 / 9])
    torch.testing.assert_close(smooth_l1(x, torch.zeros(3), sigma), expected)


def test_localisation_loss_normaliser_is_number_sampled():
    pred = torch.tensor([[1.0, 0, 0, 0], [5.0, 0, 0, 0], [9.0, 9, 9, 9]])
    target = torch.zeros(3, 4)
    labels = torch.tensor([1, 0, -1])  # one positive, one negative, one ignored
    # only the positive's 4 numbers count; divided by the 2 sampled items
    assert math.isclose(float(localisation_loss(pred, target, labels, sigma=1.0)), 0.5 / 2)


def test_classification_loss_ignores_minus_one_and_empty_is_zero():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    labels = torch.tensor([0, 1, -1])
    expected = F.cross_entropy(logits[:2], labels[:2])
    torch.testing.assert_close(classification_loss(logits, labels), expected)
    assert float(classification_loss(logits, torch.full((3,), -1))) == 0.0


def test_roi_loss_touches_only_the_ground_truth_class():
    num_classes = 20
    pred = torch.randn(4, num_classes + 1, 4, requires_grad=True)
    labels = torch.tensor([3, 0, 17, -1])
    target = torch.randn(4, 4)
    loss = localisation_loss(select_class_deltas(pred, labels), target, labels, sigma=1.0)
    loss.backward()
    nonzero = pred.grad.abs().sum(-1) > 0  # (4, K+1)
    expected = torch.zeros_like(nonzero)
    expected[0, 3] = True
    expected[2, 17] = True
    assert torch.equal(nonzero, expected)


def test_focal_loss_against_hand_computed_value():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(4.0), 0.0]])  # p(fg)=0.75 ; p(bg)=0.8
    labels = torch.tensor([1, 0])
    gamma, alpha = 2.0, 0.25
    fg = -alpha * (1 - 0.75) ** gamma * math.log(0.75)
    bg = -(1 - alpha) * (1 - 0.8) ** gamma * math.log(0.8)
    assert math.isclose(float(focal_cross_entropy(logits, labels, gamma, alpha)), (fg + bg) / 2, rel_tol=1e-5)
    # gamma 0 without alpha is cross-entropy
    torch.testing.assert_close(focal_cross_entropy(logits, labels, 0.0), F.cross_entropy(logits, labels))
