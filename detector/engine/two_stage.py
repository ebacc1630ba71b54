"""Building the two-stage mitosis counter: hard-negative mining, thresholds chosen on
validation, and the bundle checkpoint that ``infer_tiles.py`` and ``train_net.py --eval-only``
run as one model.

The recipe (``docs/results/reproduce_mitosis.sh`` runs it):
1. train the detector (figures + tissue without figures as negatives);
2. :func:`mine_negatives`: run it over images whose figures are all annotated (tissue without
   figures, the training crops) and write every detection farther than ``radius_um`` from an
   annotated figure as a "look-alike" object (a COCO file of negative-only annotations);
3. train the patch classifier on the figures against the mined look-alikes and nuclei;
4. :func:`choose_thresholds` on validation (figures of held-out slides, tissue of held-out
   slides without figures) and :func:`write_bundle`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.spatial import cKDTree
from tqdm import tqdm

from ..data.coco import load_coco, new_coco, save_coco
from ..data.image_io import read_image
from ..fileio import atomic_write
from ..inference.second_stage import FUSIONS, SecondStage, fuse_scores, predict_two_stage
from .checkpoint import load_checkpoint

logger = logging.getLogger(__name__)

#: The category of mined false positives (list it in DATASETS.NEGATIVE_CATEGORIES).
LOOK_ALIKE = "look-alike"
#: MIDOG's matching rule: a detection within 7.5 um of a figure's centre finds it.
MATCH_RADIUS_UM = 7.5


def _centres_xywh(anns: Sequence[Dict[str, Any]]) -> np.ndarray:
    return np.array([[a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2]
                     for a in anns], np.float64).reshape(-1, 2)


@dataclass
class ImageCandidates:
    """The candidates of one image: detector and stage-2 scores, centres, and the truth."""

    file: str
    area_mm2: float
    radius_px: float
    centres: np.ndarray          # (N, 2) candidate centres, px
    det_scores: np.ndarray       # (N,)
    fig_scores: np.ndarray       # (N,) p(figure) of stage 2 (== det_scores without one)
    labels: np.ndarray           # (N,) predicted class ids
    gt: np.ndarray               # (M, 2) annotated figure centres
    gt_labels: np.ndarray        # (M,) their category ids


def collect_candidates(detector: torch.nn.Module, second: Optional[SecondStage], coco_path: str,
                       default_mpp: float = 0.25, negative_categories: Sequence[str] = (),
                       progress: bool = True) -> List[ImageCandidates]:
    """Run both stages (every candidate of the detector above its own test threshold; stage 2
    on all of them) over the images of a COCO file, keeping the truth beside them."""
    data = load_coco(coco_path)
    neg = {c["id"] for c in data["categories"] if c["name"] in set(negative_categories)}
    by_image: Dict[int, List[Dict[str, Any]]] = {}
    for a in data["annotations"]:
        if a["category_id"] not in neg:
            by_image.setdefault(a["image_id"], []).append(a)
    keep_all = None if second is None else SecondStage(
        second.model, second.classes, second.patch_size, second.threshold, 0.0, second.mpp,
        fusion=second.fusion)
    out = []
    for im in tqdm(data["images"], desc=os.path.basename(coco_path), disable=not progress,
                   leave=False):
        path = os.path.join(data["_image_root"], im["file_name"])
        image = read_image(path)
        mpp = float(im.get("mpp") or default_mpp)
        inst, det_scores = predict_two_stage(detector, keep_all, image)
        anns = by_image.get(im["id"], [])
        out.append(ImageCandidates(
            file=path, area_mm2=image.shape[0] * image.shape[1] * (mpp / 1000.0) ** 2,
            radius_px=MATCH_RADIUS_UM / mpp, centres=inst.box_centres(),
            det_scores=det_scores, fig_scores=inst.scores.copy(), labels=inst.labels.copy(),
            gt=_centres_xywh(anns), gt_labels=np.array([a["category_id"] for a in anns],
                                                       np.int64)))
    return out


def _near_truth(img: ImageCandidates, radius_px: Optional[float] = None) -> np.ndarray:
    """(N,) whether each candidate lies within ``radius_px`` (default: the matching radius) of
    an annotated figure."""
    if len(img.gt) == 0 or len(img.centres) == 0:
        return np.zeros(len(img.centres), bool)
    d, _ = cKDTree(img.gt).query(img.centres, k=1)
    return d <= (img.radius_px if radius_px is None else radius_px)


def mine_negatives(detector: torch.nn.Module, coco_path: str, output: str,
                   score_thresh: float = 0.3, default_mpp: float = 0.25,
                   negative_categories: Sequence[str] = (), progress: bool = True,
                   category: str = LOOK_ALIKE, exclude_um: float = MATCH_RADIUS_UM
                   ) -> Dict[str, Any]:
    """Hard-negative mining: every detection with score >= ``score_thresh`` farther than
    ``exclude_um`` (default 7.5 um, the matching radius) from an annotated figure of
    ``coco_path`` becomes a ``category`` object (default
    ``look-alike``) of a new COCO file ``output`` (same images and image root, that one
    category). Only images whose figures are all annotated may be mined (tissue known to hold
    none, or fully annotated fields): an unannotated figure would be taught as a look-alike.
    With a nucleus model as ``detector`` and ``category="nucleus"`` this harvests ordinary
    nuclei of the figures' own images (same scanner and stain) as negatives; a wider
    ``exclude_um`` then keeps the second half of an anaphase out of them."""
    cands = collect_candidates(detector, None, coco_path, default_mpp, negative_categories,
                               progress)
    data = load_coco(coco_path)
    out = new_coco([{"id": 1, "name": category, "supercategory": "cell"}],
                   data["_image_root"], f"detector false positives mined from {coco_path}")
    n_mined = 0
    for im, c in zip(data["images"], cands):
        keep = (c.det_scores >= score_thresh) & ~_near_truth(c, c.radius_px * exclude_um
                                                              / MATCH_RADIUS_UM)
        out["images"].append({k: v for k, v in im.items() if not k.startswith("_")})
        for (cx, cy), s in zip(c.centres[keep], c.det_scores[keep]):
            side = c.radius_px * 12.5 / MATCH_RADIUS_UM  # the point converters' 12.5 um box
            out["annotations"].append({
                "image_id": im["id"], "category_id": 1, "iscrowd": 0, "score": float(s),
                "bbox": [float(cx - side / 2), float(cy - side / 2), float(side), float(side)],
                "area": float(side * side)})
            n_mined += 1
    save_coco(out, output)
    area = sum(c.area_mm2 for c in cands)
    stats = {"images": len(cands), "look_alikes": n_mined, "area_mm2": area,
             "per_mm2": n_mined / area if area else 0.0, "score_thresh": score_thresh,
             "category": category, "exclude_um": exclude_um}
    logger.info("mined %d %s objects from %d images (%.1f per mm^2) into %s", n_mined,
                category, len(cands), stats["per_mm2"], output)
    return stats


class CandidateTable:
    """All candidates of a set of images flattened once, so that an operating point (figures
    found and false positives at a pair of thresholds) is a few vector operations: the
    threshold search visits thousands of pairs."""

    def __init__(self, images: Sequence[ImageCandidates]) -> None:
        det, fig, near, pair_gt, pair_cand = [], [], [], [], []
        n_cand = n_gt = 0
        self.area = 0.0
        for img in images:
            det.append(img.det_scores)
            fig.append(img.fig_scores)
            near.append(_near_truth(img))
            if len(img.gt) and len(img.centres):
                hits = cKDTree(img.gt).query_ball_point(img.centres, img.radius_px)
                for c, gs in enumerate(hits):
                    for g in gs:
                        pair_gt.append(n_gt + g)
                        pair_cand.append(n_cand + c)
            n_cand += len(img.centres)
            n_gt += len(img.gt)
            self.area += img.area_mm2
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        self.det, self.fig = cat(det, np.float64), cat(fig, np.float64)
        self.near = cat(near, bool)
        self.pair_gt = np.asarray(pair_gt, np.int64)
        self.pair_cand = np.asarray(pair_cand, np.int64)
        self.n_gt = n_gt

    def point(self, t_det: float, t_fig: float) -> Dict[str, float]:
        keep = (self.det >= t_det) & (self.fig >= t_fig)
        fp = int((keep & ~self.near).sum())
        found = np.zeros(self.n_gt, bool)
        found[self.pair_gt[keep[self.pair_cand]]] = True
        tp = int(found.sum())
        return {"t_det": t_det, "t_fig": t_fig, "figures": self.n_gt, "found": tp,
                "false_positives": fp, "recall": tp / self.n_gt if self.n_gt else float("nan"),
                "area_mm2": self.area, "fp_per_mm2": fp / self.area if self.area else float("nan")}


def operating_point(images: Sequence[ImageCandidates], t_det: float, t_fig: float
                    ) -> Dict[str, float]:
    """Figures found (any kept candidate within the radius), false positives (kept candidates
    near no figure) and FP per mm^2 at detector threshold ``t_det`` and stage-2 threshold
    ``t_fig``."""
    return CandidateTable(images).point(t_det, t_fig)


def choose_thresholds(positives: Sequence[ImageCandidates], negatives: Sequence[ImageCandidates],
                      max_fp_per_mm2: float) -> Tuple[Dict[str, float], Dict[str, float]]:
    """The detector and stage-2 thresholds with the highest recall on ``positives`` (figures of
    validation slides) whose false positives on ``negatives`` (validation tissue without
    figures) stay at or below ``max_fp_per_mm2``; ties go to fewer false positives, then to the
    higher detector threshold (fewer candidates for stage 2). The stage-2 threshold is then put
    in the middle of the gap where that outcome holds: between the highest look-alike it
    rejects and the lowest figure it keeps, so that a figure or a look-alike of new data a
    little past the validation ones does not flip the answer (the top of the gap, the rule
    before, sits on the lowest kept figure's score and gives up every figure scored just below
    it). Returns (the positives' operating point, the negatives')."""
    t_dets = np.round(np.arange(0.05, 0.951, 0.05), 2)
    figs = np.concatenate([c.fig_scores for c in list(positives) + list(negatives)] + [np.ones(1)])
    t_figs = np.unique(np.round(np.quantile(figs, np.linspace(0, 1, 401)), 4))
    pos_t, neg_t = CandidateTable(positives), CandidateTable(negatives)
    best = None
    ties: List[float] = []  # the stage-2 thresholds of the best outcome at the best detector one
    for td in t_dets:
        for tf in t_figs:
            neg = neg_t.point(float(td), float(tf))
            if neg["fp_per_mm2"] > max_fp_per_mm2:
                continue
            pos = pos_t.point(float(td), float(tf))
            key = (pos["recall"], -neg["false_positives"], td)
            if best is None or key > best[0]:
                best, ties = (key, pos, neg), [float(tf)]
            elif key == best[0]:
                ties.append(float(tf))
    if best is None:  # nothing meets the bound: the fewest false positives
        td, tf = float(t_dets[-1]), 1.0
        return pos_t.point(td, tf), neg_t.point(td, tf)
    td = float(best[0][2])
    # the outcome is monotone in the threshold, so the tied thresholds are one interval of the grid
    tf = round((min(ties) + max(ties)) / 2, 4)
    return pos_t.point(td, tf), neg_t.point(td, tf)


def with_fusion(images: Sequence[ImageCandidates], fusion: str) -> List[ImageCandidates]:
    """``images`` (collected with the "classifier" rule: ``fig_scores`` = p(figure)) with their
    final scores formed by ``fusion`` instead (:func:`fuse_scores`)."""
    return [dataclasses.replace(img, fig_scores=fuse_scores(img.fig_scores, img.det_scores,
                                                             fusion)) for img in images]


def choose_fusion(positives: Sequence[ImageCandidates], negatives: Sequence[ImageCandidates],
                  max_fp_per_mm2: float, fusions: Sequence[str] = FUSIONS
                  ) -> Tuple[str, Dict[str, float], Dict[str, float], Dict[str, Any]]:
    """The score rule (``fusions``, each with its own thresholds by :func:`choose_thresholds`)
    of the highest validation recall within the bound; ties go to fewer false positives, then
    to the first rule listed (the classifier alone). ``positives``/``negatives`` are collected
    with the "classifier" rule. Returns (rule, positives' point, negatives' point, every rule's
    points)."""
    tried: Dict[str, Any] = {}
    best = None
    for i, fusion in enumerate(fusions):
        pos, neg = choose_thresholds(with_fusion(positives, fusion),
                                     with_fusion(negatives, fusion), max_fp_per_mm2)
        tried[fusion] = {"positives": pos, "negatives": neg}
        key = (pos["recall"], -neg["false_positives"], -i)
        if best is None or key > best[0]:
            best = (key, fusion, pos, neg)
    assert best is not None
    return best[1], best[2], best[3], tried


def best_f1_threshold(images: Sequence[ImageCandidates], stage2: bool = False) -> Dict[str, float]:
    """The detector-only (or, with ``stage2``, the stage-2) threshold of best point F1 on
    ``images``, and its operating point: how a one-stage detector's threshold is chosen."""
    table = CandidateTable(images)
    best = None
    for t in np.round(np.arange(0.05, 0.991, 0.01), 2):
        op = table.point(0.0, float(t)) if stage2 else table.point(float(t), 0.0)
        tp, fp, n = op["found"], op["false_positives"], op["figures"]
        f1 = 2 * tp / (2 * tp + fp + (n - tp)) if tp else 0.0
        if best is None or f1 > best["f1"]:
            best = dict(op, f1=f1, threshold=float(t))
    return best or {}


def write_bundle(detector_path: str, classifier_path: str, output: str, candidate_threshold: float,
                 threshold: float, info: Optional[Dict[str, Any]] = None,
                 fusion: str = "classifier") -> None:
    """One checkpoint holding both stages (see :mod:`detector.inference.second_stage`): the
    detector's entries as they are, plus ``second_stage``. Training states are left out."""
    det = load_checkpoint(detector_path)
    cls = load_checkpoint(classifier_path)
    bundle = {k: det[k] for k in ("model", "config", "classes", "mpp", "iteration") if k in det}
    bundle["second_stage"] = {
        "model": cls["model"], "config": cls["config"], "classes": list(cls["classes"]),
        "mpp": cls.get("mpp"), "threshold": float(threshold),
        "candidate_threshold": float(candidate_threshold), "fusion": fusion,
        "info": dict(info or {}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with atomic_write(output, "wb") as f:
        torch.save(bundle, f)
