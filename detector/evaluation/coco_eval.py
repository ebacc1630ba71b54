"""COCO AP/AR through pycocotools ``COCOeval`` (with ``maxDets`` large enough for dense nuclei),
and AP recomputed from COCOeval's per-image matches for bootstrap resamples of the images."""
from __future__ import annotations

import contextlib
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.cocoeval import COCOeval

from ..data.coco import annotation_to_rle, to_pycocotools


class FastCOCOeval(COCOeval):
    """``COCOeval`` with the same per-image greedy matching, visiting only the (detection, GT)
    pairs whose IoU reaches the lowest threshold.

    pycocotools loops in Python over every threshold x detection x GT object (O(T D G) per
    image: seconds for a 1000 x 1000 px tile of 500 nuclei); a GT below the lowest threshold can
    never be chosen, and skipping it cannot change a break (that only fires on ignored GTs after
    a match), so the results are identical (checked against ``COCOeval`` in the tests).
    """

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802 (pycocotools' name)
        p = self.params
        if p.useCats:
            gt = self._gts[imgId, catId]
            dt = self._dts[imgId, catId]
        else:
            gt = [_ for cId in p.catIds for _ in self._gts[imgId, cId]]
            dt = [_ for cId in p.catIds for _ in self._dts[imgId, cId]]
        if len(gt) == 0 and len(dt) == 0:
            return None
        for g in gt:
            g["_ignore"] = 1 if (g["ignore"] or g["area"] < aRng[0] or g["area"] > aRng[1]) \
                else 0
        gtind = np.argsort([g["_ignore"] for g in gt], kind="mergesort")
        gt = [gt[i] for i in gtind]
        dtind = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in dtind[0:maxDet]]
        iscrowd = [int(o["iscrowd"]) for o in gt]
        ious = self.ious[imgId, catId][:, gtind] if len(self.ious[imgId, catId]) > 0 \
            else self.ious[imgId, catId]
        T, G, D = len(p.iouThrs), len(gt), len(dt)
        gtm = np.zeros((T, G))
        dtm = np.zeros((T, D))
        gtIg = np.array([g["_ignore"] for g in gt])  # noqa: N806
        dtIg = np.zeros((T, D))  # noqa: N806
        if not len(ious) == 0:
            ious = np.asarray(ious)
            thr_min = min(min(p.iouThrs), 1 - 1e-10)
            gt_ig = gtIg.tolist()
            for dind in range(D):
                cols = np.flatnonzero(ious[dind] >= thr_min)
                if len(cols) == 0:
                    continue
                vals = ious[dind, cols].tolist()
                cols = cols.tolist()
                for tind, t in enumerate(p.iouThrs):
                    iou = min([t, 1 - 1e-10])
                    m = -1
                    for gind, v in zip(cols, vals):
                        if gtm[tind, gind] > 0 and not iscrowd[gind]:
                            continue
                        if m > -1 and gt_ig[m] == 0 and gt_ig[gind] == 1:
                            break
                        if v < iou:
                            continue
                        iou = v
                        m = gind
                    if m == -1:
                        continue
                    dtIg[tind, dind] = gtIg[m]
                    dtm[tind, dind] = gt[m]["id"]
                    gtm[tind, m] = dt[dind]["id"]
        a = np.array([d["area"] < aRng[0] or d["area"] > aRng[1] for d in dt]).reshape((1, D))
        dtIg = np.logical_or(dtIg, np.logical_and(dtm == 0, np.repeat(a, T, 0)))  # noqa: N806
        return {"image_id": imgId, "category_id": catId, "aRng": aRng, "maxDet": maxDet,
                "dtIds": [d["id"] for d in dt], "gtIds": [g["id"] for g in gt],
                "dtMatches": dtm, "gtMatches": gtm, "dtScores": [d["score"] for d in dt],
                "gtIgnore": gtIg, "dtIgnore": dtIg}


def _gt_for_cocoeval(gt: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of the GT with the keys COCOeval needs (``id``, ``iscrowd``, ``area``)."""
    g = {k: v for k, v in gt.items() if not k.startswith("_")}
    sizes = {im["id"]: (int(im["height"]), int(im["width"])) for im in gt["images"]}
    anns = []
    for n, a in enumerate(gt["annotations"]):
        a = dict(a)
        a.setdefault("id", n + 1)
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            rle = annotation_to_rle(a, *sizes[a["image_id"]])
            a["area"] = float(mask_utils.area(rle)) if rle is not None else \
                float(a["bbox"][2] * a["bbox"][3])
        anns.append(a)
    g["annotations"] = anns
    if "info" not in g:
        g["info"] = {}
    return g


def max_dets_list(max_dets: int) -> List[int]:
    """COCOeval's three maxDets; AP/AP50/AP75/AR use the last one."""
    return [min(10, max_dets), min(100, max_dets), int(max_dets)]


def run_cocoeval(gt: Dict[str, Any], results: Sequence[Dict[str, Any]], iou_type: str = "segm",
                 max_dets: int = 1000) -> Tuple[Dict[str, float], Optional[COCOeval]]:
    """COCO AP (0.50:0.95), AP50, AP75 and AR at ``max_dets`` detections per image, plus AP per
    category (``AP/<category id>``). ``iou_type``: "segm" (masks) or "bbox".

    An empty results list scores 0 (pycocotools cannot load one); returns ``(metrics, None)``.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    if not results or not gt["annotations"]:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AR": 0.0}, None
    coco_gt = to_pycocotools(_gt_for_cocoeval(gt))
    res = [dict(r) for r in results]
    for r in res:
        r.pop("id", None)
        if iou_type == "bbox":
            r.pop("segmentation", None)  # loadRes would otherwise recompute the box from it
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(res)  # res holds our own dict copies; loadRes adds keys
        ev = FastCOCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = max_dets_list(max_dets)
        # only the 'all' area range: small/medium/large are COCO's natural-image sizes and
        # would quadruple COCOeval's (Python) per-image matching time
        ev.params.areaRng = [[0.0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    # AP from the precision array at maxDets[-1]: COCOeval.summarize() takes its headline AP
    # (stats[0]) at maxDets=100 whatever params.maxDets says, which truncates dense images
    prec = ev.eval["precision"][:, :, :, 0, -1]  # T x R x K
    rec = ev.eval["recall"][:, :, 0, -1]  # T x K
    iou = np.asarray(ev.params.iouThrs)

    def mean_valid(a: np.ndarray) -> float:
        a = a[a > -1]
        return float(a.mean()) if a.size else -1.0

    out = {"AP": mean_valid(prec), "AP50": mean_valid(prec[np.isclose(iou, 0.5)]),
           "AP75": mean_valid(prec[np.isclose(iou, 0.75)]), "AR": mean_valid(rec)}
    for k, cat in enumerate(ev.params.catIds):
        out[f"AP/{cat}"] = mean_valid(prec[:, :, k])
    # COCOeval reports -1 when there is no GT at all; keep metrics in [0, 1]
    for key in ("AP", "AP50", "AP75", "AR"):
        out[key] = max(out[key], 0.0)
    return out, ev


class APResampler:
    """AP (0.50:0.95, area 'all', at max_dets) of any multiset of images, recomputed from one
    COCOeval run's per-image matches, as ``COCOeval.accumulate`` does (101-point interpolated
    precision, averaged over IoU thresholds and categories with ground truth).

    COCOeval itself evaluates fixed image sets; bootstrap resamples repeat images, so the
    accumulation is redone here on the stored matches instead of re-running the matching.
    """

    def __init__(self, ev: COCOeval, image_ids: Sequence[int]):
        p = ev.params
        self.rec_thrs = np.asarray(p.recThrs)
        self.n_iou = len(p.iouThrs)
        self.iou_thrs = np.asarray(p.iouThrs)
        max_det = p.maxDets[-1]
        n_area, n_img = len(p.areaRng), len(p.imgIds)
        pos = {img: i for i, img in enumerate(p.imgIds)}
        self.cats = list(p.catIds)
        # per category, per requested image: (scores, tp (T x n), fp (T x n), n_gt)
        self.data: List[List[Tuple[np.ndarray, np.ndarray, np.ndarray, int]]] = []
        for k in range(len(self.cats)):
            per_img = []
            for img in image_ids:
                e = ev.evalImgs[k * n_area * n_img + pos[img]] if img in pos else None
                if e is None:
                    per_img.append((np.zeros(0), np.zeros((self.n_iou, 0), bool),
                                    np.zeros((self.n_iou, 0), bool), 0))
                    continue
                sc = np.asarray(e["dtScores"][:max_det], np.float64)
                dtm = np.asarray(e["dtMatches"])[:, :max_det]
                dtig = np.asarray(e["dtIgnore"])[:, :max_det].astype(bool)
                npig = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
                per_img.append((sc, (dtm != 0) & ~dtig, (dtm == 0) & ~dtig, npig))
            self.data.append(per_img)

    def ap(self, sample: Optional[Sequence[int]] = None) -> float:
        """AP of the images at positions ``sample`` (with repeats) of ``image_ids``; all when
        None. Returns 0 when no category has ground truth in the sample."""
        return self.ap_by_iou(sample)[0]

    def ap_by_iou(self, sample: Optional[Sequence[int]] = None) -> Tuple[float, float, float]:
        """``(AP, AP50, AP75)`` of the images at positions ``sample`` (see :meth:`ap`)."""
        vals = []
        for per_img in self.data:
            items = per_img if sample is None else [per_img[i] for i in sample]
            npig = sum(it[3] for it in items)
            if npig == 0:
                continue
            sc = np.concatenate([it[0] for it in items])
            order = np.argsort(-sc, kind="mergesort")
            tps = np.concatenate([it[1] for it in items], axis=1)[:, order]
            fps = np.concatenate([it[2] for it in items], axis=1)[:, order]
            tp_sum = np.cumsum(tps, axis=1, dtype=np.float64)
            fp_sum = np.cumsum(fps, axis=1, dtype=np.float64)
            prec_all = np.zeros((self.n_iou, len(self.rec_thrs)))
            for t in range(self.n_iou):
                tp, fp = tp_sum[t], fp_sum[t]
                if tp.size == 0:
                    continue
                rc = tp / npig
                pr = tp / (fp + tp + np.spacing(1))
                pr = np.maximum.accumulate(pr[::-1])[::-1]
                inds = np.searchsorted(rc, self.rec_thrs, side="left")
                ok = inds < len(pr)
                prec_all[t, ok] = pr[inds[ok]]
            vals.append(prec_all)
        if not vals:
            return 0.0, 0.0, 0.0
        p = np.stack(vals)  # K x T x R
        i50 = int(np.argmin(np.abs(self.iou_thrs - 0.5)))
        i75 = int(np.argmin(np.abs(self.iou_thrs - 0.75)))
        return float(p.mean()), float(p[:, i50].mean()), float(p[:, i75].mean())
