"""Point (mitosis) metrics: centroid-distance matching within a radius in micrometres.

A ground-truth object and a prediction match when their centres (the box centre; a point is a
zero-size box) are at most ``radius_um / mpp`` pixels apart; the assignment is one-to-one
(Hungarian on the pairs within the radius, maximising the number of matches, ties broken by the
smaller distance), and only same-category pairs can match. TP, FP and FN are summed over all
images before computing F1 (as the MIDOG challenges score: 7.5 um by default). The score
threshold that maximises F1 is found on a validation split and applied unchanged to test.
"""
from __future__ import annotations

import numpy as np

from .inputs import ImageObjects
from .matching import distance_pairs, match_pairs
from .metrics import ImageEval, _per_class, sweep_scores

MIDOG_RADIUS_UM = 7.5


def evaluate_image_points(pred: ImageObjects, gt: ImageObjects, radius_px: float,
                          score_thresh: float = 0.5, sweep: bool = True) -> ImageEval:
    """Match one image's predicted centres to its ground-truth centres within ``radius_px``.

    Returns an :class:`ImageEval` whose instance-only fields (``tp_iou``, AJI, PQ) stay empty.
    """
    rows, cols, dist = distance_pairs(pred.centres(), gt.centres(), radius_px,
                                      pred.labels, gt.labels)
    weights = 1.0 - dist / max(radius_px, 1e-9)
    keep = pred.scores >= score_thresh
    m = match_pairs(rows, cols, weights, valid=keep[rows])
    tp_sweep = npred_sweep = None
    if sweep:
        tp_sweep, npred_sweep = sweep_scores(rows, cols, weights, pred.scores,
                                             np.ones(len(rows), bool))
    return ImageEval(
        n_gt=len(gt), n_pred=int(keep.sum()), tp=len(m),
        per_class=_per_class(pred.labels[keep], gt.labels, gt.labels[cols[m]]),
        matched_pred=rows[m], matched_gt=cols[m], tp_sweep=tp_sweep, npred_sweep=npred_sweep)


def count_correlation(true_counts: np.ndarray, pred_counts: np.ndarray) -> dict:
    """Agreement of per-image counts: Pearson r, Spearman rho, mean absolute error and mean
    error (predicted - true). r and rho are None when either side is constant."""
    from scipy.stats import pearsonr, spearmanr

    t = np.asarray(true_counts, np.float64)
    p = np.asarray(pred_counts, np.float64)
    out = {"n_images": int(len(t)), "mae": float(np.mean(np.abs(p - t))) if len(t) else 0.0,
           "mean_error": float(np.mean(p - t)) if len(t) else 0.0,
           "pearson_r": None, "spearman_rho": None}
    if len(t) >= 2 and np.ptp(t) > 0 and np.ptp(p) > 0:
        out["pearson_r"] = float(pearsonr(t, p)[0])
        out["spearman_rho"] = float(spearmanr(t, p)[0])
    return out
