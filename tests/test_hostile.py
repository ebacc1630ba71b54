"""What a hostile user tried (issue 14), kept as tests: corrupt and odd input, kill -9 during
training and slide runs, reruns into finished outputs, replaced weights, absurd sizes. Each
case is a real file or a real process killed with SIGKILL, and each failed before its fix.

Tiny models and data (the CPU config shrunk as in test_train.py) keep the file to about a
minute on two cores."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from detector.cli.convert_to_coco import main as convert_main
from detector.cli.evaluate import main as evaluate_main
from detector.cli.infer_tiles import main as infer_main
from detector.cli.train_net import main as train_main
from detector.config.config import get_cfg
from detector.data.coco import load_coco, save_coco
from detector.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tests.conftest import shared_path
from tests.test_dataset import make_disc_coco
from tests.test_eval_metrics import gt_as_results
from tests.test_train import CONFIG, ROOT, tiny_opts

torch.set_num_threads(1)
SVS = ("slides", "CMU-1-Small-Region.svs")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _ckpt_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _wait_for(predicate, proc, timeout=240.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _kill_when(cmd, ready, what):
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds, and check that the kill (not
    the end of the run) stopped it."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(ready, proc), f"{what} ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def discs(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_discs")
    return {"dir": d, "train": make_disc_coco(str(d), n_images=4, name="train.json")}


@pytest.fixture(scope="module")
def finished_run(discs, tmp_path_factory):
    """A finished 4-iteration run with a checkpoint every 2 iterations (all kept)."""
    out = tmp_path_factory.mktemp("hostile_run") / "run"
    opts = tiny_opts(discs["train"], out, "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2",
                     "SOLVER.CHECKPOINTS_KEPT", "0")
    assert train_main(["--config-file", CONFIG, *opts]) == 0
    return out, opts


def _copy_run(finished_run, tmp_path):
    src, opts = finished_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst, [str(dst) if o == str(src) else o for o in opts]


# ------------------------------------------------------------------------------ training
def test_rerun_without_resume_refuses_instead_of_destroying_a_finished_run(finished_run,
                                                                           tmp_path, capsys):
    out, opts = _copy_run(finished_run, tmp_path)
    final, metrics = _ckpt_bytes(out / "model_final.pth"), (out / "metrics.json").read_text()
    rc = train_main(["--config-file", CONFIG, *opts])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "--resume" in err and "fresh OUTPUT_DIR" in err and str(out) in err
    assert _ckpt_bytes(out / "model_final.pth") == final
    assert (out / "metrics.json").read_text() == metrics


def test_resume_with_a_dangling_last_checkpoint_uses_the_newest_that_loads(finished_run,
                                                                           tmp_path, capsys):
    """last_checkpoint names a missing file: resume from model_0000004.pth (the newest that
    loads), never restart at 0 and overwrite model_0000002.pth."""
    out, opts = _copy_run(finished_run, tmp_path)
    (out / "last_checkpoint").write_text("model_0000009.pth\n")
    old2 = _ckpt_bytes(out / "model_0000002.pth")
    opts = [*opts, "SOLVER.MAX_ITER", "5"]
    assert train_main(["--config-file", CONFIG, "--resume", *opts]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "model_0000004.pth" in err
    assert _ckpt_bytes(out / "model_0000002.pth") == old2
    assert load_checkpoint(str(out / "model_final.pth"))["iteration"] == 5
    iters = [json.loads(l)["iter"] for l in open(out / "metrics.json") if "total_loss" in l]
    assert iters == [1, 2, 3, 4, 5]


def test_resume_refuses_when_no_checkpoint_loads(finished_run, tmp_path, capsys):
    out, opts = _copy_run(finished_run, tmp_path)
    for name in ("model_0000002.pth", "model_0000004.pth"):
        (out / name).write_bytes(b"not a checkpoint")
    (out / "last_checkpoint").unlink()
    final = _ckpt_bytes(out / "model_final.pth")
    rc = train_main(["--config-file", CONFIG, "--resume", *opts])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "no checkpoint" in err and "loads" in err
    assert (out / "model_0000002.pth").read_bytes() == b"not a checkpoint"
    assert _ckpt_bytes(out / "model_final.pth") == final


@pytest.mark.slow
def test_kill_9_during_training_then_resume(discs, tmp_path):
    """A real ``kill -9`` of train_net.py after its second checkpoint (a checkpoint every
    iteration, 2 kept), plus the temporary file a kill during a checkpoint write leaves:
    --resume removes the orphan, continues from last_checkpoint, and pruning leaves the newest
    2 periodic checkpoints beside model_final.pth (inference only) and model_best.pth."""
    out = tmp_path / "run"
    val = make_disc_coco(str(tmp_path), n_images=1, seed=3, name="val.json")
    opts = tiny_opts(discs["train"], out, "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD",
                     "1", "SOLVER.CHECKPOINTS_KEPT", "2", test=val)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", CONFIG,
           *opts]
    marker = out / "last_checkpoint"
    _kill_when(cmd, lambda: marker.exists() and marker.read_text().strip()
               not in ("", "model_0000001.pth"), "training")
    last = (out / "last_checkpoint").read_text().strip()
    start = int(last[len("model_"):-len(".pth")])
    orphan = out / ".tmp-k1ll3d-model_0000099.pth"  # what a kill inside torch.save leaves
    orphan.write_bytes(b"\0" * 1000)
    stop = start + 2
    rc = train_main(["--config-file", CONFIG, "--resume",
                     *[o if o != "40" else str(stop) for o in opts]])
    assert rc == 0
    assert not orphan.exists()
    periodic = sorted(n for n in os.listdir(out) if n.startswith("model_0"))
    assert periodic == [f"model_{stop - 1:07d}.pth", f"model_{stop:07d}.pth"]
    assert (out / "last_checkpoint").read_text().strip() == f"model_{stop:07d}.pth"
    final = load_checkpoint(str(out / "model_final.pth"))
    assert final["iteration"] == stop and {"model", "config", "classes", "mpp"} <= set(final)
    assert not {"optimizer", "scheduler", "rng"} & set(final)
    assert (out / "model_best.pth").is_file()
    iters = [json.loads(l)["iter"] for l in open(out / "metrics.json") if "total_loss" in l]
    assert iters == list(range(1, stop + 1))


def test_pruning_keeps_the_checkpoint_last_checkpoint_names(tmp_path):
    from detector.engine.checkpoint import prune_checkpoints, resume_candidates

    for i in range(1, 6):
        (tmp_path / f"model_{i:07d}.pth").write_bytes(b"x")
    for name in ("model_final.pth", "model_best.pth"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth\n")  # a resumed older state
    gone = prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.path.basename(p) for p in gone) == ["model_0000002.pth", "model_0000003.pth"]
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth",
                                            "model_0000004.pth", "model_0000005.pth",
                                            "model_best.pth", "model_final.pth"]
    assert prune_checkpoints(str(tmp_path), 0) == []  # 0: keep all
    # --resume tries the newest first (a kill between the checkpoint and last_checkpoint)
    assert [os.path.basename(p) for p in resume_candidates(str(tmp_path))] == [
        "model_0000005.pth", "model_0000004.pth", "model_0000001.pth"]
    assert get_cfg(None).SOLVER.CHECKPOINTS_KEPT == 3


@pytest.mark.parametrize("case", ["negative_lr", "gpu", "python_tag", "output_under_a_file",
                                  "unwritable_output", "flag_after_pairs", "box_without_width"])
def test_bad_training_input_is_one_line_and_exit_2(case, discs, tmp_path, capsys):
    train, extra, before = discs["train"], [], []
    out = tmp_path / "out"
    if case == "negative_lr":
        extra, expect = ["SOLVER.BASE_LR", "-0.001"], ["SOLVER.BASE_LR", "-0.001", "> 0"]
    elif case == "gpu":
        extra, expect = ["MODEL.DEVICE", "gpu"], ["MODEL.DEVICE", "'gpu'", "cuda"]
    elif case == "python_tag":
        extra = ["MODEL.DEVICE", '!!python/object/apply:os.system ["echo PWNED"]']
        expect = ["MODEL.DEVICE", "YAML tag", "!!python/object/apply:os.system"]
    elif case == "output_under_a_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "run"
        expect = ["OUTPUT_DIR", "cannot write", str(out)]
    elif case == "unwritable_output":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = ro / "run"
        expect = ["OUTPUT_DIR", "cannot write", "Permission denied"]
    elif case == "flag_after_pairs":
        extra, expect = ["--num-gpus", "1"], ["--num-gpus", "after the KEY VALUE", "before"]
    else:
        coco = load_coco(train)
        boxes = [a for a in coco["annotations"]]
        for a in boxes:
            a.pop("segmentation", None)
        boxes[0]["bbox"][2] = 0
        boxes[1]["bbox"][3] = float("nan")
        bad = str(tmp_path / "boxes.json")
        coco["info"]["image_root"] = coco["_image_root"]
        save_coco({k: v for k, v in coco.items() if not k.startswith("_")}, bad)
        train = bad
        extra = ["MODEL.META_ARCHITECTURE", "FasterRCNN"]
        expect = ["boxes.json", "2 box annotation(s)", "width and height", "nan"]
    rc = train_main(["--config-file", CONFIG, *before,
                     *tiny_opts(train, out, "SOLVER.MAX_ITER", "1"), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and "PWNED" not in err
    for word in expect:
        assert word in err, (word, err)
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_resume_written_after_the_overrides_is_taken(finished_run, tmp_path, capsys):
    out, opts = _copy_run(finished_run, tmp_path)
    final = _ckpt_bytes(out / "model_final.pth")
    assert train_main(["--config-file", CONFIG, *opts, "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert _ckpt_bytes(out / "model_final.pth") == final  # finished: nothing to redo


# ------------------------------------------------------------------------------ checkpoints
def test_refused_pickle_is_named_without_torchs_unsafe_advice(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "config": "", "classes": [], "x": os.system}, evil)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(evil))
    msg = str(e.value)
    assert str(evil) in msg and "system" in msg
    assert "weights_only" not in msg and "trusted source" not in msg
    from detector.modeling.build import WeightsError, load_weights

    with pytest.raises(WeightsError) as e:
        load_weights(torch.nn.Linear(1, 1), str(evil))
    assert "weights_only" not in str(e.value) and "system" in str(e.value)


# ------------------------------------------------------------------------------ evaluation
@pytest.mark.parametrize("score,shown", [("nan", "nan"), ("inf", "inf"), ('"high"', "'high'"),
                                         ("null", "None")])
def test_evaluate_refuses_scores_that_are_not_finite_numbers(score, shown, discs, tmp_path,
                                                             capsys):
    preds = gt_as_results(load_coco(discs["train"]), score=0.9)
    preds[-1]["score"] = "@"
    literal = {"nan": "NaN", "inf": "Infinity"}.get(score, score)  # as json.dump writes them
    (tmp_path / "pred.json").write_text(json.dumps(preds).replace('"@"', literal))
    rc = evaluate_main(["--gt", discs["train"], "--pred", str(tmp_path / "pred.json"),
                        "--out", str(tmp_path / "ev"), "--bootstrap", "0", "--no-report"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert f"entry {len(preds) - 1}" in err and f"score {shown}" in err and "finite" in err
    assert not (tmp_path / "ev" / "metrics.json").exists()


# ------------------------------------------------------------------------------ conversion
def test_split_writes_all_files_or_none_and_names_the_output(discs, tmp_path, capsys):
    out = tmp_path / "data.json"
    (tmp_path / "data_test.json").mkdir()  # the second split file cannot be written
    rc = convert_main(["--format", "coco", "--input", discs["train"], "--output", str(out),
                       "--split", "train=0.5,test=0.5", "--seed", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "data_test.json" in err and ".tmp-" not in err
    assert not (tmp_path / "data_train.json").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_points_with_nan_coordinates_are_invalid_not_outside(tmp_path, capsys):
    img = tmp_path / "img"
    img.mkdir()
    import cv2

    cv2.imwrite(str(img / "a.png"), np.full((50, 60, 3), 200, np.uint8))
    (tmp_path / "points.csv").write_text("x,y,label,slide\n10,12,mitosis,a\nnan,5,mitosis,a\n"
                                         "inf,7,mitosis,a\n")
    rc = convert_main(["--format", "points", "--input", str(tmp_path / "points.csv"),
                       "--images", str(img), "--box-size-px", "8",
                       "--output", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "line 3" in err and "invalid point" in err and "outside" not in err


def test_unparsable_microns_per_pixel_is_a_warning(tmp_path, capsys):
    tif = shared_path("monuseg", "TCGA-2Z-A9J9-01A-01-TS1.tif")
    xml = tif.with_suffix(".xml")
    d = tmp_path / "in"
    d.mkdir()
    os.symlink(tif, d / tif.name)
    text = xml.read_text(encoding="utf-8", errors="replace")
    import re

    text, n = re.subn(r'MicronsPerPixel="[^"]*"', 'MicronsPerPixel="0,2527 um"', text, count=1)
    assert n == 1
    (d / xml.name).write_text(text, encoding="utf-8")
    rc = convert_main(["--format", "xml", "--input", str(d), "--mpp", "0.25",
                       "--output", str(tmp_path / "x.json"), "--workers", "1"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "warning:" in printed and "MicronsPerPixel '0,2527 um'" in printed
    assert load_coco(str(tmp_path / "x.json"))["images"][0]["mpp"] == 0.25


# ------------------------------------------------------------------------------ slides
def _tiny_checkpoint(path, seed):
    from detector.modeling.build import build_model

    torch.manual_seed(seed)
    cfg = get_cfg(None, ["MODEL.BACKBONE.NAME", "resnet18", "MODEL.BACKBONE.OUT_CHANNELS", "32",
                         "MODEL.ROI_HEADS.FC_DIM", "64", "MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE",
                         "10", "MODEL.RPN.PRE_NMS_TOPK_TEST", "100",
                         "MODEL.RPN.POST_NMS_TOPK_TEST", "50"])
    classes = [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "mitotic figure"}]
    save_checkpoint(str(path), build_model(cfg, classes), cfg, classes, 2.0, 0)
    return str(path)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("two_models")
    return _tiny_checkpoint(d / "a.pth", 0), _tiny_checkpoint(d / "b.pth", 1)


def _infer_args(weights, svs, out, *extra):
    return ["--weights", weights, "--input", svs, "--output", str(out), "--tile-size", "64",
            "--overlap", "8", "--batch-size", "1", "--num-workers", "0", "--score-thresh", "0",
            "--roi", "0,0,700,700", "--no-tissue-detection", "--device", "cpu", "--quiet",
            *extra]


@pytest.mark.slow
def test_resume_after_kill_9_with_replaced_weights_restarts_the_slide(two_models, tmp_path,
                                                                      capsys):
    """kill -9 of a slide run with weights A; the file is then replaced by other weights B (a
    training run rewriting model_best.pth): --resume must not merge A's tiles with B's, and a
    slide finished with B is redone, not skipped, when the file holds A again."""
    svs = str(shared_path(*SVS))
    a, b = two_models
    weights = tmp_path / "model_best.pth"
    shutil.copy(a, weights)
    out = tmp_path / "out"
    journal = out / "CMU-1-Small-Region" / ".journal.jsonl"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "infer_tiles.py"),
           *_infer_args(str(weights), svs, out)]
    _kill_when(cmd, lambda: journal.exists() and len(journal.read_text().splitlines()) >= 3,
               "the slide run")
    assert journal.exists()
    shutil.copy(b, str(weights) + ".new")
    os.replace(str(weights) + ".new", weights)  # rewritten atomically, as training does
    assert infer_main(_infer_args(str(weights), svs, out, "--resume")) == 0
    ref = tmp_path / "ref"
    assert infer_main(_infer_args(b, svs, ref)) == 0
    got = json.loads((out / "CMU-1-Small-Region" / "detections.json").read_text())
    want = json.loads((ref / "CMU-1-Small-Region" / "detections.json").read_text())
    assert len(got) == len(want) and got == want
    s_b = json.loads((out / "CMU-1-Small-Region" / "summary.json").read_text())
    assert s_b["weights_sha256"] == json.loads(
        (ref / "CMU-1-Small-Region" / "summary.json").read_text())["weights_sha256"]
    capsys.readouterr()
    # finished with B; the file now holds A again: redone, not skipped
    shutil.copy(a, weights)
    assert infer_main(_infer_args(str(weights), svs, out, "--resume")) == 0
    assert "1 analysed, 0 already finished" in capsys.readouterr().out
    s_a = json.loads((out / "CMU-1-Small-Region" / "summary.json").read_text())
    assert s_a["weights_sha256"] != s_b["weights_sha256"]
    # same weights again: skipped
    assert infer_main(_infer_args(str(weights), svs, out, "--resume")) == 0
    assert "1 already finished" in capsys.readouterr().out


def test_huge_tile_is_bounded_by_the_region_and_memory_is_checked(two_models, tmp_path,
                                                                  capsys, monkeypatch):
    """--tile-size 100000 --roi 0,0,600,600 ran one slide-sized tile (24 GB on a big slide,
    then the kernel's OOM killer): tiles are now no larger than the region, and a run whose
    tiles cannot fit in memory stops before reading any with a message naming the flags."""
    from detector.inference import tiling

    svs = str(shared_path(*SVS))
    a, _ = two_models
    out = tmp_path / "out"
    args = ["--weights", a, "--input", svs, "--output", str(out), "--tile-size", "100000",
            "--roi", "0,0,600,600", "--num-workers", "0", "--device", "cpu", "--quiet"]
    assert infer_main(args) == 0
    s = json.loads((out / "CMU-1-Small-Region" / "summary.json").read_text())
    # 600 level-0 px at 0.499 um/px seen at the model's 2 um/px: about 150 analysis px
    assert s["analysis"]["tile_size"] <= 160
    monkeypatch.setattr(tiling, "available_memory_bytes", lambda: 64 * 2 ** 20)
    capsys.readouterr()
    rc = infer_main(["--weights", a, "--input", svs, "--output", str(tmp_path / "o2"),
                     "--tile-size", "100000", "--num-workers", "0", "--device", "cpu", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 1 and "FAILED" in printed and "--tile-size" in printed and "GiB" in printed
    assert not (tmp_path / "o2" / "CMU-1-Small-Region" / "summary.json").exists()
    # the geometry alone
    assert tiling.bounded_tile_size(100000, (150, 152)) == 152
    assert tiling.bounded_tile_size(512, (3000, 4000)) == 512
    assert tiling.region_size((742, 555), [np.array([[0, 0], [600, 0], [600, 600]])], 4.0) == \
        (152, 152)
    with pytest.raises(ValueError, match="tiles of 8192 px"):
        tiling.check_tile_memory(8192, 4, 2, available=8 * 2 ** 30)
    assert tiling.check_tile_memory(512, 4, 2, available=8 * 2 ** 30) > 0


def test_bad_device_for_infer_is_one_line(two_models, tmp_path, caplog):
    rc = infer_main(["--weights", two_models[0], "--input", str(shared_path(*SVS)),
                     "--output", str(tmp_path), "--device", "gpu", "--quiet"])
    assert rc == 2 and "--device gpu" in caplog.text
