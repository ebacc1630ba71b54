"""The two-stage mitosis counter: mining, thresholds on validation, the bundle, and stage 2
re-scoring candidates on a slide (patches read at the right place through level resampling)."""
import json
import os

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from detector.config.config import get_cfg
from detector.data.coco import image_entry, new_coco, save_coco
from detector.data.dataset import CocoInstanceDataset
from detector.data.patches import read_patch
from detector.engine.checkpoint import load_checkpoint, save_checkpoint
from detector.engine.two_stage import (ImageCandidates, choose_fusion, choose_thresholds,
                                       mine_negatives, operating_point, write_bundle)
from detector.evaluation.classification import classification_metrics
from detector.inference.runner import InferenceOptions, infer_slide
from detector.inference.second_stage import SecondStage, second_stage_from_checkpoint
from detector.modeling.build import build_model
from detector.structures.instances import Instances

torch.set_num_threads(1)
FIGURE = [{"id": 1, "name": "mitotic figure"}]
PHASES = [{"id": 1, "name": "metaphase"}, {"id": 2, "name": "atypical"}]


class BlobDetector(nn.Module):
    """Stage 1 stand-in: every dark square blob (dark and mid-grey alike, as a detector trained
    on figure crops circles every dark nucleus) becomes a candidate box of 24 px."""

    def forward(self, images, targets=None):
        from scipy import ndimage as ndi

        out = []
        for im in images:
            g = im.float().mean(0).numpy()
            lab, n = ndi.label(g < 0.6)
            boxes = []
            for sl in ndi.find_objects(lab):
                cy, cx = (sl[0].start + sl[0].stop) / 2, (sl[1].start + sl[1].stop) / 2
                boxes.append([cx - 12, cy - 12, cx + 12, cy + 12])
            k = len(boxes)
            out.append(Instances(g.shape, np.array(boxes, np.float32).reshape(-1, 4),
                                 np.full(k, 0.9, np.float32), np.ones(k, np.int64)))
        return out


class DarkCentreClassifier(nn.Module):
    """Stage 2 stand-in: a patch whose central 6 x 6 px are near-black is a figure (class 2,
    'atypical'), anything else a look-alike; a patch read at the wrong place is not."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x, targets=None):
        c = x.shape[-1] // 2
        centre = x[:, :, c - 3:c + 3, c - 3:c + 3].mean(dim=(1, 2, 3))
        fig = (centre < 0.2).float()
        return torch.stack([1 - fig, torch.zeros_like(fig), fig], 1) + 0 * self.w


def blob_image(h=600, w=800, dark=((100, 120), (400, 300), (700, 500)),
               grey=((250, 450), (520, 100))):
    img = np.full((h, w, 3), 225, np.uint8)
    for x, y in dark:
        img[y - 8:y + 8, x - 8:x + 8] = 10
    for x, y in grey:
        img[y - 8:y + 8, x - 8:x + 8] = 110
    return img


def test_read_patch_fills_the_border_never_mirrors():
    # a mirrored dark nucleus at an image border looks like an anaphase: the part of a patch
    # outside the image is filled (white by default), so no structure is doubled
    img = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    read = lambda t, l, h, w: img[t:t + h, l:l + w]  # noqa: E731
    p = read_patch(read, 10, 12, 6.0, 5.0, 4)
    assert np.array_equal(p, img[3:7, 4:8])
    p = read_patch(read, 10, 12, 1.0, 1.0, 6)  # near the corner
    assert p.shape == (6, 6, 3) and np.array_equal(p[2:, 2:], img[:4, :4])
    assert (p[:2] == 255).all() and (p[:, :2] == 255).all()
    p = read_patch(read, 10, 12, 11.0, 9.0, 6, fill=0)  # the opposite corner, black fill
    assert np.array_equal(p[:4, :4], img[6:, 8:]) and (p[4:] == 0).all() and (p[:, 4:] == 0).all()
    assert (read_patch(read, 10, 12, 50.0, 50.0, 4) == 255).all()  # wholly outside


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    probs = np.array([[.9, .1, 0], [.3, .6, .1], [.1, .8, .1], [.2, .1, .7], [0, .1, .9],
                      [0, .2, .8], [.6, .1, .3]])
    m = classification_metrics(labels, probs, ["look-alike", "metaphase", "atypical"])
    assert m["confusion"] == [[1, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert m["tp"] == 4 and m["fp"] == 1 and m["fn"] == 1
    # among the 5 true figures: atypical said for [2-class] rows 3, 4, 5, 6? p_atyp > p_norm
    assert m["atypical_balanced_accuracy"] == pytest.approx((1 / 2 + 3 / 3) / 2)


def _cands(gt, centres, det, fig, area=1.0):
    return ImageCandidates("x", area, 10.0, np.array(centres, float).reshape(-1, 2),
                           np.array(det, float), np.array(fig, float), np.ones(len(det), int),
                           np.array(gt, float).reshape(-1, 2), np.ones(len(gt), int))


def test_thresholds_are_the_best_pair_under_the_false_positive_bound():
    pos = [_cands([[50, 50]], [[52, 50], [90, 90]], [0.9, 0.8], [0.95, 0.2]),
           _cands([[30, 30]], [[30, 33]], [0.35], [0.7]),
           _cands([[60, 60]], [[61, 60]], [0.6], [0.3])]
    neg = [_cands([], [[10, 10], [40, 40], [70, 70]], [0.95, 0.5, 0.3], [0.6, 0.4, 0.99],
                  area=1.0)]
    p, n = choose_thresholds(pos, neg, max_fp_per_mm2=1.0)
    # brute force over all pairs (every score is a threshold that changes the outcome)
    scores = sorted({0.0, *(float(v) for c in pos + neg for v in c.fig_scores)})
    best = max(((operating_point(pos, td, tf)["recall"],
                 -operating_point(neg, td, tf)["false_positives"], td, tf)
                for td in np.round(np.arange(0.05, 0.951, 0.05), 2)
                for tf in scores
                if operating_point(neg, td, tf)["fp_per_mm2"] <= 1.0))
    assert p["recall"] == best[0] and n["false_positives"] == -best[1]
    assert n["fp_per_mm2"] <= 1.0 and p["recall"] == pytest.approx(2 / 3)
    assert operating_point(pos, 0.05, 0.0)["recall"] == 1.0  # unbounded, all found


def test_stage2_threshold_sits_in_the_middle_of_the_gap():
    """Validation figures at p 0.9 and 0.8, look-alikes at 0.5 and 0.3, no false positive
    allowed: every threshold in (0.5, 0.8] gives the same outcome, and the bundle's is the
    middle of that gap, not its edge at the lowest kept figure (which would lose a new figure
    scored 0.75)."""
    pos = [_cands([[50, 50]], [[50, 51]], [0.9], [0.9]),
           _cands([[50, 50]], [[51, 50]], [0.9], [0.8])]
    neg = [_cands([], [[10, 10], [30, 30]], [0.9, 0.9], [0.5, 0.3], area=1.0)]
    p, n = choose_thresholds(pos, neg, max_fp_per_mm2=0.0)
    assert p["recall"] == 1.0 and n["false_positives"] == 0
    assert p["t_fig"] == pytest.approx(0.65, abs=0.01)
    assert p["t_det"] == 0.9  # among equal outcomes, the fewest candidates for stage 2


def test_fusion_rule_is_chosen_on_validation_and_travels_in_the_bundle(tmp_path):
    """A figure the detector is sure of but the classifier doubts (A), one the classifier is
    sure of (B), and a look-alike both half like (N): no pair of thresholds keeps A and B
    without N, while the geometric mean of the two scores ranks N last, so the bundle step
    chooses it; the bundle then scores candidates by it."""
    pos = [_cands([[50, 50]], [[50, 51]], [0.99], [0.40]),
           _cands([[50, 50]], [[51, 50]], [0.55], [0.95])]
    neg = [_cands([], [[10, 10]], [0.80], [0.45], area=1.0)]
    fusion, p, n, tried = choose_fusion(pos, neg, max_fp_per_mm2=0.0)
    assert tried["classifier"]["positives"]["recall"] == 0.5
    assert fusion == "geometric" and p["recall"] == 1.0 and n["false_positives"] == 0
    assert np.sqrt(0.8 * 0.45) < p["t_fig"] <= np.sqrt(0.99 * 0.40)
    # ties go to the classifier alone
    assert choose_fusion(pos[1:], neg, 0.0)[0] == "classifier"

    _random_bundle(tmp_path, 0.3, p["t_fig"])
    write_bundle(str(tmp_path / "det.pth"), str(tmp_path / "cls.pth"), str(tmp_path / "g.pth"),
                 0.3, p["t_fig"], fusion="geometric")
    assert second_stage_from_checkpoint(load_checkpoint(str(tmp_path / "b.pth"))).fusion \
        == "classifier"
    second = second_stage_from_checkpoint(load_checkpoint(str(tmp_path / "g.pth")))
    inst = Instances((100, 100), np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
                     np.array([0.99, 0.8], np.float32), np.ones(2, np.int64))
    out, det = second.rescore(inst, np.array([[0.6, 0.3, 0.1], [0.55, 0.05, 0.4]], np.float32))
    np.testing.assert_allclose(out.scores, np.sqrt([0.99 * 0.4, 0.8 * 0.45]), rtol=1e-6)
    np.testing.assert_allclose(det, [0.99, 0.8])
    assert list(out.labels) == [1, 2]


def figure_coco(tmp_path, img: np.ndarray) -> str:
    """``img`` (600 x 800 px at 0.25 um/px) as ``f.png`` and a COCO file ``a.json`` holding it
    with one annotated figure centred at (400, 300); returns the COCO file's path."""
    import cv2

    cv2.imwrite(str(tmp_path / "f.png"), img[..., ::-1])
    coco = new_coco(FIGURE, ".")
    coco["images"].append(image_entry(1, "f.png", 600, 800, mpp=0.25))
    coco["annotations"].append({"image_id": 1, "category_id": 1, "bbox": [390, 290, 20, 20],
                                "area": 400, "iscrowd": 0})
    save_coco(coco, str(tmp_path / "a.json"))
    return str(tmp_path / "a.json")


def test_mining_writes_only_detections_away_from_figures(tmp_path):
    figure_coco(tmp_path, blob_image())
    stats = mine_negatives(BlobDetector(), str(tmp_path / "a.json"), str(tmp_path / "m.json"),
                           score_thresh=0.5, default_mpp=0.25, progress=False)
    mined = json.loads((tmp_path / "m.json").read_text())
    centres = sorted((a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2)
                     for a in mined["annotations"])
    assert stats["look_alikes"] == 4 and mined["categories"][0]["name"] == "look-alike"
    assert centres == sorted([(100.0, 120.0), (700.0, 500.0), (250.0, 450.0), (520.0, 100.0)])
    # the mined file trains as negatives beside the positive set
    cfg = get_cfg(None, ["MODEL.META_ARCHITECTURE", "PatchClassifier",
                         "DATASETS.NEGATIVE_CATEGORIES", "[look-alike]"])
    ds = CocoInstanceDataset([str(tmp_path / "a.json"), str(tmp_path / "m.json")], cfg)
    assert [len(r["negatives"]) for r in ds.records] == [0, 4]


def test_nuclei_of_the_figures_own_images_are_harvested_beyond_the_exclusion(tmp_path):
    """mine --category nucleus --exclude-um: a nucleus model's objects in the figure crops
    become "nucleus" negatives, except those within exclude_um of a figure (the far half of an
    anaphase lies beyond the 7.5 um matching radius but must not be taught as a nucleus)."""
    # blobs 24 px (6 um) and 48 px (12 um) right of the figure at (400, 300), one far away
    figure_coco(tmp_path, blob_image(dark=((400, 300), (424, 300), (448, 300), (700, 500)),
                                     grey=()))
    centres = {}
    for um in (7.5, 15.0):
        out = tmp_path / f"n{um}.json"
        mine_negatives(BlobDetector(), str(tmp_path / "a.json"), str(out), score_thresh=0.0,
                       default_mpp=0.25, progress=False, category="nucleus", exclude_um=um)
        mined = json.loads(out.read_text())
        assert mined["categories"][0]["name"] == "nucleus"
        centres[um] = sorted(a["bbox"][0] + a["bbox"][2] / 2 for a in mined["annotations"])
    assert centres[7.5] == [448.0, 700.0]  # 6 um off: excluded; 12 um off: a nucleus
    assert centres[15.0] == [700.0]


def _run_blob_slide(tmp_path, grey, tile_size, nuclei=None):
    """3 dark figures and ``grey`` look-alikes on a 1200 x 1600 px slide at 0.25 um/px, run
    with a model trained at 0.5 um/px (the slide is analysed at half size) and stage 2."""
    img = blob_image(1200, 1600, dark=((200, 240), (800, 600), (1400, 1000)), grey=grey)
    path = str(tmp_path / "slide.tif")
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb")
    second = SecondStage(DarkCentreClassifier(), PHASES, patch_size=16, threshold=0.5,
                         candidate_threshold=0.5)
    opts = InferenceOptions(mpp=0.25, num_workers=0, tissue_detection=False, progress=False,
                            tile_size=tile_size, overlap=48, score_thresh=0.5)
    return infer_slide(BlobDetector(), FIGURE, 0.5, path, str(tmp_path / "out"), opts,
                       second_stage=second, nuclei=nuclei)


def test_second_stage_rescores_candidates_on_a_resampled_slide(tmp_path):
    s = _run_blob_slide(tmp_path, ((500, 900), (1040, 200)), 256)
    assert s["second_stage"]["candidates"] == 5
    assert s["second_stage"]["mitotic_figures_before"] == 5
    assert s["second_stage"]["mitotic_figures_after"] == 3 == s["mitotic_figures"]["total"]
    assert s["mitotic_figures"]["by_class"] == {"metaphase": 0, "atypical": 3}
    with open(tmp_path / "out" / "slide" / "detections.csv") as f:
        rows = f.read().splitlines()
    assert len(rows) == 4  # header + the 3 dark figures


def _random_bundle(tmp_path, candidate_threshold, threshold, *detector_opts, info=None):
    """A bundle of a randomly initialised small Faster R-CNN and patch classifier (phases),
    written by the engine's checkpoint writer and write_bundle: det.pth, cls.pth, b.pth."""
    cfg = get_cfg(None, ["MODEL.META_ARCHITECTURE", "FasterRCNN", "MODEL.BACKBONE.NAME",
                         "resnet18", "MODEL.BACKBONE.OUT_CHANNELS", "32",
                         "MODEL.RPN.POST_NMS_TOPK_TEST", "20", *detector_opts])
    ccfg = get_cfg(None, ["MODEL.META_ARCHITECTURE", "PatchClassifier",
                          "MODEL.CLASSIFIER.PATCH_SIZE", "32"])
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "det.pth"), build_model(cfg, FIGURE), cfg, FIGURE, 0.5, 10)
    save_checkpoint(str(tmp_path / "cls.pth"), build_model(ccfg, PHASES), ccfg, PHASES, 0.5, 10)
    write_bundle(str(tmp_path / "det.pth"), str(tmp_path / "cls.pth"), str(tmp_path / "b.pth"),
                 candidate_threshold, threshold, info)


def test_bundle_round_trip_and_cli_threshold(tmp_path, capsys):
    _random_bundle(tmp_path, 0.3, 0.77, info={"note": "test"})
    ckpt = load_checkpoint(str(tmp_path / "b.pth"))  # weights_only
    assert "optimizer" not in ckpt and ckpt["second_stage"]["threshold"] == 0.77
    second = second_stage_from_checkpoint(ckpt)
    assert second.classes == PHASES and second.candidate_threshold == 0.3
    assert second.patch_size == 32 and not second.model.training
    assert second_stage_from_checkpoint(load_checkpoint(str(tmp_path / "det.pth"))) is None
    # the CLI runs both stages from the one file, at the bundle's threshold
    from detector.cli.infer_tiles import main

    img = blob_image()
    tifffile.imwrite(str(tmp_path / "s.tif"), img, photometric="rgb")
    rc = main(["--weights", str(tmp_path / "b.pth"), "--input", str(tmp_path / "s.tif"),
               "--output", str(tmp_path / "o"), "--mpp", "0.5", "--num-workers", "0", "--quiet",
               "--device", "cpu"])
    assert rc == 0
    s = json.loads((tmp_path / "o" / "s" / "summary.json").read_text())
    assert s["second_stage"]["threshold"] == 0.77
    assert s["second_stage"]["candidate_threshold"] == 0.3
    assert set(s["counts"]) == {"metaphase", "atypical"}


def test_mitotic_index_from_a_nuclei_model_in_the_same_call(tmp_path):
    nuclei = (BlobDetector(), [{"id": 1, "name": "nucleus"}], 0.25)  # every blob is a nucleus
    s = _run_blob_slide(tmp_path, ((500, 900), (1040, 200), (300, 700), (900, 300)), 512, nuclei)
    assert s["mitotic_figures"]["total"] == 3
    assert s["nuclei"]["count"] == 7
    assert s["mitotic_index"] == pytest.approx(3 / 7)
    assert os.path.isfile(tmp_path / "out" / "slide" / "nuclei" / "summary.json")
    assert s["nuclei"]["tissue_area_mm2"] == pytest.approx(s["tissue_area_mm2"])


def test_eval_only_of_a_bundle_reports_both_stages(tmp_path, capsys):
    """``train_net.py --eval-only`` with a bundle: metrics after stage 2 and, as
    ``<file>/stage1``, the detector alone (here a random detector: the numbers are not the
    point, the two rows and their thresholds are)."""
    import cv2

    from detector.cli.train_net import main as train_main

    _random_bundle(tmp_path, 0.0, 0.4, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    coco = new_coco(FIGURE, ".")
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), blob_image(160, 160, dark=((80, 80),), grey=()))
        coco["images"].append(image_entry(i + 1, f"f{i}.png", 160, 160, mpp=0.5))
        coco["annotations"].append({"image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                    "bbox": [70, 70, 20, 20], "area": 400})
    save_coco(coco, str(tmp_path / "test.json"))
    (tmp_path / "eval.yaml").write_text("MODEL:\n  DEVICE: cpu\n")
    rc = train_main(["--config-file", str(tmp_path / "eval.yaml"), "--eval-only", "MODEL.WEIGHTS", str(tmp_path / "b.pth"),
                     "DATASETS.TEST", f"[{tmp_path / 'test.json'}]", "OUTPUT_DIR",
                     str(tmp_path / "eval"), "TEST.SCORE_THRESH", "0.3"])
    assert rc == 0
    res = json.loads((tmp_path / "eval" / "eval_final.json").read_text())["metrics"]
    assert set(res) == {"test", "test/stage1"}
    assert res["test"]["score_thresh"] == 0.4 and res["test/stage1"]["score_thresh"] == 0.3
    assert os.path.isfile(tmp_path / "eval" / "predictions_test_stage1.json")


def test_patch_classifier_trains_and_answers_in_eval_mode(tmp_path):
    """Dark blobs (figures) against grey ones (nuclei, negative-only) through train_net.py: the
    eval-mode network must tell them apart (a MobileNet with torchvision's BatchNorm momentum
    of 0.01 answered 'look-alike' to everything after a short run)."""
    import cv2

    from detector.engine.trainer import Trainer

    rng = np.random.default_rng(0)
    coco = new_coco(FIGURE + [{"id": 2, "name": "nucleus"}], ".")
    for i in range(12):
        dark = [tuple(int(v) for v in rng.integers(30, 170, 2)) for _ in range(3)]
        grey = [tuple(int(v) for v in rng.integers(30, 170, 2)) for _ in range(3)]
        img = blob_image(200, 200, dark=dark, grey=grey)
        cv2.imwrite(str(tmp_path / f"f{i}.png"), img[..., ::-1])
        coco["images"].append(image_entry(i + 1, f"f{i}.png", 200, 200, mpp=0.25))
        for (x, y), cat in [(p, 1) for p in dark] + [(p, 2) for p in grey]:
            coco["annotations"].append({"image_id": i + 1, "category_id": cat, "iscrowd": 0,
                                        "bbox": [x - 10, y - 10, 20, 20], "area": 400})
    save_coco(coco, str(tmp_path / "train.json"))
    cfg = get_cfg(None, ["MODEL.META_ARCHITECTURE", "PatchClassifier", "MODEL.DEVICE", "cpu",
                         "MODEL.CLASSIFIER.PATCH_SIZE", "64", "DATASETS.TRAIN",
                         f"[{tmp_path / 'train.json'}]", "DATASETS.TEST",
                         f"[{tmp_path / 'train.json'}]", "DATASETS.NEGATIVE_CATEGORIES",
                         "[nucleus]", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "16",
                         "SOLVER.MAX_ITER", "40", "SOLVER.WARMUP_ITERS", "5", "SOLVER.OPTIMIZER",
                         "AdamW", "SOLVER.BASE_LR", "0.003", "TEST.EVAL_PERIOD", "0",
                         "OUTPUT_DIR", str(tmp_path / "run")])
    metrics = Trainer(cfg).train()["train"]
    assert metrics["balanced_accuracy"] > 0.9 and metrics["recall"] > 0.9
    assert metrics["precision"] > 0.9


def test_classifier_tta_answers_the_same_for_every_flip_and_rotation():
    """With MODEL.CLASSIFIER.TTA a patch and its flips/rotations get one answer (probabilities
    averaged over the 8 views); without it they differ for an untrained network."""
    cfg = get_cfg(None, ["MODEL.META_ARCHITECTURE", "PatchClassifier", "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg, FIGURE).eval()
    x = torch.rand(2, 3, 64, 64)
    views = torch.cat([x.flip(3), torch.rot90(x, 1, dims=(2, 3)), x.transpose(2, 3)])
    with torch.no_grad():
        p, pv = model(x), model(views)
        assert p.shape == (2, 2) and torch.allclose(p.sum(1), torch.ones(2))
        for k in range(3):
            assert torch.allclose(pv[2 * k:2 * k + 2], p, atol=1e-5)
        model.tta = False
        assert not torch.allclose(model(x.flip(3)), model(x), atol=1e-5)


def test_hard_negatives_get_their_share_of_the_negative_samples(tmp_path):
    """DATALOADER.HARD_NEGATIVE_FRACTION: mined look-alikes are drawn that share of the
    negative samples however few they are beside the random nuclei."""
    from detector.data.patches import CocoPatchDataset

    coco = new_coco(FIGURE + [{"id": 2, "name": "nucleus"}, {"id": 3, "name": "look-alike"}], str(tmp_path))
    img = np.full((100, 100, 3), 200, np.uint8)
    import cv2
    cv2.imwrite(str(tmp_path / "a.png"), img)
    coco["images"].append(image_entry(1, "a.png", 100, 100, mpp=0.25))
    for i, cat in enumerate([1] * 4 + [2] * 30 + [3] * 3):
        coco["annotations"].append({"image_id": 1, "category_id": cat, "iscrowd": 0,
                                    "bbox": [i * 2, 40, 10, 10], "area": 100})
    save_coco(coco, str(tmp_path / "t.json"))
    opts = ["MODEL.META_ARCHITECTURE", "PatchClassifier", "DATASETS.NEGATIVE_CATEGORIES",
            "[nucleus, look-alike]", "DATALOADER.NEGATIVE_FRACTION", "0.5"]
    ds = CocoPatchDataset([str(tmp_path / "t.json")], get_cfg(None, opts), classes=FIGURE)
    w = ds.sample_weights()
    assert w[ds.hard].sum() == pytest.approx(0.5 * 3 / 33)  # in proportion to their numbers
    ds = CocoPatchDataset([str(tmp_path / "t.json")],
                          get_cfg(None, opts + ["DATALOADER.HARD_NEGATIVE_FRACTION", "0.6"]),
                          classes=FIGURE)
    w = ds.sample_weights()
    assert ds.hard.sum() == 3 and w.sum() == pytest.approx(1.0)
    assert w[ds.hard].sum() == pytest.approx(0.3) and w[ds.labels() > 0].sum() == pytest.approx(0.5)


def test_stage2_cli_reports_a_bad_checkpoint_by_name(tmp_path, capsys):
    """A missing or corrupt checkpoint stops `mitosis_stage2.py` with status 2 and one line
    naming the file, not a traceback."""
    from detector.cli.mitosis_stage2 import main

    bad = tmp_path / "detector.pth"
    bad.write_bytes(b"not a checkpoint")
    rc = main(["--device", "cpu", "mine", "--weights", str(bad), "--input", "a.json",
               "--output", "b.json"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "detector.pth" in err
    assert "Traceback" not in err
    assert torch.is_grad_enabled()  # the CLI's no-grad mode ends with the call


def test_bundle_cli_stdout_is_one_json_document(tmp_path, capsys):
    """`mitosis_stage2.py bundle > bundle.json` (as reproduce_mitosis.sh does) leaves a file
    that json.load reads: the validation operating points on stdout, status lines on stderr."""
    import cv2

    from detector.cli.mitosis_stage2 import main

    _random_bundle(tmp_path, 0.0, 0.4, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    for name, dark, annotate in (("pos", ((80, 80),), True), ("neg", (), False)):
        coco = new_coco(FIGURE, ".")
        cv2.imwrite(str(tmp_path / f"{name}.png"), blob_image(160, 160, dark=dark, grey=()))
        coco["images"].append(image_entry(1, f"{name}.png", 160, 160, mpp=0.5))
        if annotate:
            coco["annotations"].append({"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                        "bbox": [70, 70, 20, 20], "area": 400})
        save_coco(coco, str(tmp_path / f"{name}.json"))
    rc = main(["--device", "cpu", "bundle", "--detector", str(tmp_path / "det.pth"),
               "--classifier", str(tmp_path / "cls.pth"),
               "--val-positives", str(tmp_path / "pos.json"),
               "--val-negatives", str(tmp_path / "neg.json"), "--output", str(tmp_path / "m.pth")])
    out, err = capsys.readouterr()
    assert rc == 0 and "wrote" in err and str(tmp_path / "m.pth") in err
    info = json.loads(out)
    second = load_checkpoint(str(tmp_path / "m.pth"))["second_stage"]
    assert info["threshold"] == pytest.approx(second["threshold"])
    assert info["candidate_threshold"] == pytest.approx(second["candidate_threshold"])
    assert info["validation"]["max_fp_per_mm2"] == 2.0
