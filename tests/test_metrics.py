"""The paper's metric: box IoU, one-to-one matching, the nearest-match variant."""

from __future__ import annotations

import numpy as np
import pytest

from emmae.metrics import Score, box_iou, score_micrograph


def test_box_iou_analytic():
    a = np.array([[0.0, 0.0]])
    assert box_iou(a, np.array([[0.0, 0.0]]), 10)[0, 0] == 1.0
    assert box_iou(a, np.array([[5.0, 0.0]]), 10)[0, 0] == pytest.approx(50 / 150)  # half overlap
    assert box_iou(a, np.array([[20.0, 0.0]]), 10)[0, 0] == 0.0
    shift = 10 * (1 - 0.6) / (1 + 0.6)  # IoU 0.6 exactly for a shift along one axis
    assert box_iou(a, np.array([[shift, 0.0]]), 10)[0, 0] == pytest.approx(0.6)


def test_one_to_one_counts_a_truth_once():
    truth = np.array([[100.0, 100.0], [300.0, 300.0]])
    picks = np.array([[101.0, 100.0], [99.0, 101.0], [500.0, 500.0]])  # two picks on one particle
    one = score_micrograph(picks, truth, 50.0)
    assert (one.true_positives, one.picks, one.truths) == (1, 3, 2)
    assert one.precision == pytest.approx(1 / 3) and one.recall == pytest.approx(0.5)
    assert one.f1 == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    near = score_micrograph(picks, truth, 50.0, mode="nearest")
    assert near.true_positives == 1


def test_nearest_mode_may_reuse_a_pick():
    truth = np.array([[100.0, 100.0], [104.0, 100.0]])  # two truths, one pick between them
    picks = np.array([[102.0, 100.0]])
    assert score_micrograph(picks, truth, 50.0, mode="nearest").true_positives == 2
    assert score_micrograph(picks, truth, 50.0).true_positives == 1


def test_threshold_and_empty_cases():
    truth = np.array([[0.0, 0.0]])
    assert score_micrograph(np.array([[12.0, 0.0]]), truth, 50.0).true_positives == 1  # IoU 0.61
    assert score_micrograph(np.array([[13.0, 0.0]]), truth, 50.0).true_positives == 0  # IoU 0.59
    empty = score_micrograph(np.zeros((0, 2)), truth, 50.0)
    assert (empty.true_positives, empty.picks, empty.truths, empty.f1) == (0, 0, 1, 0.0)
    pooled = Score(3, 4, 5, 2.4) + Score(1, 2, 3, 0.7)
    assert (pooled.true_positives, pooled.picks, pooled.truths) == (4, 6, 8)
    assert pooled.mean_iou == pytest.approx(3.1 / 8)
    with pytest.raises(ValueError, match="unknown matching mode"):
        score_micrograph(truth, truth, 10.0, mode="greedy")
