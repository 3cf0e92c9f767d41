"""The paper's picking metric and the reference code's nearest-match variant.

Each pick and each ground-truth centre is a box of the particle diameter. A pick is a
true positive when its IoU with a ground-truth box exceeds 0.6; ``one-to-one``
(the headline) matches each ground truth to at most one pick (maximum matching by
IoU, Hungarian on the pairs above threshold), ``nearest`` counts each ground truth as
found when its nearest pick passes the threshold, as the reference code does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

IOU_THRESHOLD = 0.6


@dataclass(frozen=True)
class Score:
    """Counts and rates of one micrograph or a pooled set."""

    true_positives: int
    picks: int
    truths: int
    iou_sum: float  # over matched ground truths

    @property
    def precision(self) -> float:
        return self.true_positives / self.picks if self.picks else 0.0

    @property
    def recall(self) -> float:
        return self.true_positives / self.truths if self.truths else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def mean_iou(self) -> float:
        """Mean IoU over all ground truths (unmatched ones count as 0)."""
        return self.iou_sum / self.truths if self.truths else 0.0

    def __add__(self, other: Score) -> Score:
        return Score(self.true_positives + other.true_positives, self.picks + other.picks, self.truths + other.truths, self.iou_sum + other.iou_sum)

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1, "mean_iou": self.mean_iou}


def box_iou(a: np.ndarray, b: np.ndarray, size: float) -> np.ndarray:
    """IoU ``[N, M]`` of equal axis-aligned squares of side ``size`` centred at ``a [N, 2]`` and ``b [M, 2]``."""
    dx = np.clip(size - np.abs(a[:, None, 0] - b[None, :, 0]), 0, None)
    dy = np.clip(size - np.abs(a[:, None, 1] - b[None, :, 1]), 0, None)
    inter = dx * dy
    return inter / (2 * size * size - inter)


def score_micrograph(picks_xy: np.ndarray, truth_xy: np.ndarray, diameter_px: float, mode: str = "one-to-one", threshold: float = IOU_THRESHOLD) -> Score:
    """Score picks against ground truth on one micrograph (same pixel frame)."""
    picks_xy = np.asarray(picks_xy, dtype=np.float64).reshape(-1, 2)
    truth_xy = np.asarray(truth_xy, dtype=np.float64).reshape(-1, 2)
    if len(picks_xy) == 0 or len(truth_xy) == 0:
        return Score(0, len(picks_xy), len(truth_xy), 0.0)
    if mode == "nearest":
        _, nearest = cKDTree(picks_xy).query(truth_xy)
        iou = box_iou(truth_xy, picks_xy[nearest], diameter_px).diagonal()
        hit = iou > threshold
        return Score(int(hit.sum()), len(picks_xy), len(truth_xy), float(iou[hit].sum()))
    if mode != "one-to-one":
        raise ValueError(f"unknown matching mode {mode!r}")
    iou = box_iou(truth_xy, picks_xy, diameter_px)
    weights = np.where(iou > threshold, iou, 0.0)
    rows, cols = linear_sum_assignment(weights, maximize=True)
    matched = weights[rows, cols] > 0
    return Score(int(matched.sum()), len(picks_xy), len(truth_xy), float(weights[rows, cols][matched].sum()))
