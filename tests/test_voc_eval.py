"""The VOC devkit's rules (VOCevaldet.m, VOCap.m), each on a hand-computed case."""

import math

import pytest
import torch

from fasterrcnn.evaluation.voc import VOC07_RECALL_THRESHOLDS, VOCEvaluator, matlab_colon, voc_ap


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def _eval(images, classes=("a",), use_07=True):
    ev = VOCEvaluator(list(classes))
    for img in images:
        ev.update(
            _t(img["det"]),
            torch.tensor(img["scores"], dtype=torch.float64),
            torch.tensor(img.get("det_labels", [1] * len(img["scores"]))),
            _t(img["gt"]),
            torch.tensor(img.get("gt_labels", [1] * len(img["gt"]))),
            torch.tensor(img.get("difficult", [False] * len(img["gt"]))),
        )
    return ev.compute(use_07_metric=use_07)


def test_matlab_colon_recall_thresholds():
    assert VOC07_RECALL_THRESHOLDS[6] == 0.6 and VOC07_RECALL_THRESHOLDS[7] == 0.7
    assert VOC07_RECALL_THRESHOLDS[3] == 3 * 0.1  # the first half counts up, as MATLAB does
    assert len(matlab_colon(0, 0.1, 1)) == 11 and matlab_colon(0, 0.1, 1)[-1] == 1.0


def test_11_point_threshold_at_exactly_0_6():
    # recall reaches exactly 0.6 (3 of 5) with precision 1, then nothing more.
    # With numpy.arange's 0.6000000000000001 the 0.6 point would be lost (AP 6/11 -> 7/11 here).
    rec = torch.tensor([0.2, 0.4, 0.6])
    prec = torch.tensor([1.0, 1.0, 1.0])
    assert math.isclose(voc_ap(rec, prec, use_07_metric=True), 7 / 11)


def test_all_point_ap_is_area_under_envelope():
    rec = torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)
    prec = torch.tensor([1.0, 0.5, 2 / 3], dtype=torch.float64)
    assert math.isclose(voc_ap(rec, prec, use_07_metric=False), 0.5 * 1.0 + 0.5 * 2 / 3)


def test_iou_uses_plus_one_areas_via_continuous_coordinates():
    # gt covers pixels 1..10 (VOC) = [0, 10) continuous; a detection [0, 5) x [0, 10) has IoU 0.5 exactly
    res = _eval([{"gt": [[0, 0, 10, 10]], "det": [[0, 0, 5, 10]], "scores": [0.9]}])
    assert res["ap"]["a"] == pytest.approx(1.0)
    # a hair less overlap and it is no match (IoU >= 0.5 is needed)
    res = _eval([{"gt": [[0, 0, 10, 10]], "det": [[0, 0, 4.99, 10]], "scores": [0.9]}])
    assert res["ap"]["a"] == 0.0


def test_touching_boxes_do_not_intersect():
    res = _eval([{"gt": [[0, 0, 10, 10]], "det": [[10, 0, 20, 10]], "scores": [0.9]}])
    assert res["ap"]["a"] == 0.0


def test_duplicate_detection_is_false_positive():
    # two detections of one object: tp then fp -> precision 1 at recall 1 (the max is taken)
    res = _eval([{"gt": [[0, 0, 10, 10], [50, 50, 60, 60]], "det": [[0, 0, 10, 10], [0, 0, 10, 10]], "scores": [0.9, 0.8]}])
    # recall 0.5 reached at precision 1; never more: 11-point AP = 6/11
    assert res["ap"]["a"] == pytest.approx(6 / 11)


def test_difficult_objects_neither_tp_nor_fp_and_not_in_recall():
    img = {
        "gt": [[0, 0, 10, 10], [50, 50, 60, 60]],
        "difficult": [False, True],
        "det": [[50, 50, 60, 60], [0, 0, 10, 10]],
        "scores": [0.9, 0.8],
    }
    # the detection of the difficult object is ignored; the other finds the only counted object
    assert _eval([img])["ap"]["a"] == pytest.approx(1.0)
    assert _eval([img])["num_gt"]["a"] == 1


def test_best_match_is_the_highest_iou_even_if_taken():
    # the devkit picks the max-IoU gt; if it is taken, the detection is a false positive even
    # though another gt would have matched
    img = {
        "gt": [[0, 0, 10, 10], [0, 0, 10, 12]],
        "det": [[0, 0, 10, 10], [0, 0, 10, 10.5]],
        "scores": [0.9, 0.8],
    }
    # det2: IoU with gt1 = 10/10.5 = .952, with gt2 = 10.5/12 = .875 -> picks gt1, taken -> fp
    res = _eval([img])
    assert res["ap"]["a"] == pytest.approx(6 / 11)


def test_ties_keep_the_given_order():
    # equal scores: the first given (a false positive) comes first
    images = [
        {"gt": [[0, 0, 10, 10]], "det": [[30, 30, 40, 40]], "scores": [0.5]},
        {"gt": [[0, 0, 10, 10]], "det": [[0, 0, 10, 10]], "scores": [0.5]},
    ]
    # order fp, tp: precision at recall .5 is 0.5
    assert _eval(images)["ap"]["a"] == pytest.approx(6 / 11 * 0.5)
    images.reverse()
    # order tp, fp: precision 1 at recall .5
    assert _eval(images)["ap"]["a"] == pytest.approx(6 / 11)


def test_scores_are_sorted_across_images():
    images = [
        {"gt": [[0, 0, 10, 10]], "det": [[30, 30, 40, 40]], "scores": [0.1]},  # fp, low score
        {"gt": [[0, 0, 10, 10]], "det": [[0, 0, 10, 10]], "scores": [0.9]},  # tp, high score
    ]
    assert _eval(images)["ap"]["a"] == pytest.approx(6 / 11)


def test_classes_are_separate_and_missing_class_is_nan():
    images = [
        {
            "gt": [[0, 0, 10, 10]],
            "gt_labels": [1],
            "det": [[0, 0, 10, 10]],
            "det_labels": [2],  # right box, wrong class
            "scores": [0.9],
        }
    ]
    res = _eval(images, classes=("a", "b"))
    assert res["ap"]["a"] == 0.0
    assert math.isnan(res["ap"]["b"])  # no ground truth of class b
    assert res["map"] == 0.0  # the NaN class is left out of the mean


def test_precision_of_all_point_metric_ignores_leading_difficult_match():
    img = {
        "gt": [[0, 0, 10, 10], [50, 50, 60, 60]],
        "difficult": [True, False],
        "det": [[0, 0, 10, 10], [50, 50, 60, 60]],
        "scores": [0.9, 0.8],
    }
    assert _eval([img], use_07=False)["ap"]["a"] == pytest.approx(1.0)
