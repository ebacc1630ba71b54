"""tools/train_net.py end to end on a tiny synthetic data set with a tiny model: outputs,
deterministic resume, time limit, non-finite loss, --eval-only, and bad input refused before
any training starts."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from detector.cli.train_net import main
from detector.config.config import get_cfg
from detector.engine.checkpoint import load_checkpoint
from detector.engine.optim import lr_factor
from detector.engine.trainer import Trainer, TrainingError, TrainingSampler
from detector.modeling.build import load_model
from tests.test_dataset import make_disc_coco

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "nuclei", "mask_rcnn_R_18_FPN_cpu.yaml")


def tiny_opts(train, out, *extra, test=None):
    """Overrides that make the CPU config tiny: resnet18 GN with 32 channels, 48 px crops."""
    return ["DATASETS.TRAIN", f"[{train}]", "DATASETS.TEST", f"[{test}]" if test else "[]",
            "OUTPUT_DIR", str(out), "MODEL.BACKBONE.OUT_CHANNELS", "32",
            "MODEL.ROI_HEADS.FC_DIM", "64", "MODEL.ROI_HEADS.BOX_HEAD_CONVS", "1",
            "MODEL.ROI_HEADS.MASK_HEAD_CONVS", "1", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
            "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "INPUT.CROP_SIZE", "48",
            "INPUT.AUG.ELASTIC_PROB", "0.5", "DATALOADER.NUM_WORKERS", "0",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.LOG_PERIOD", "1",
            "SOLVER.TIME_LIMIT_MINUTES", "0", "TEST.EVAL_PERIOD", "0", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("discs")
    train = make_disc_coco(str(d), n_images=4, empty_images=1, name="train.json")
    val = make_disc_coco(str(d), n_images=2, seed=1, name="val.json")
    return {"dir": d, "train": train, "val": val}


def test_killed_run_resumes_to_the_same_weights(data, tmp_path, monkeypatch):
    """6 iterations straight vs a run killed (KeyboardInterrupt) in iteration 5, after its
    checkpoint at 3 (CHECKPOINT_PERIOD 3), then --resume to 6: the final weights are
    bit-identical (torch.equal; CPU), and so are the losses logged after the resume."""
    import detector.engine.trainer as trainer_mod

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3"]
    assert main(["--config-file", CONFIG, *tiny_opts(data["train"], straight, *common)]) == 0

    real, calls = trainer_mod._to_device, []

    def dies_in_iteration_5(*a):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(trainer_mod, "_to_device", dies_in_iteration_5)
    assert main(["--config-file", CONFIG, *tiny_opts(data["train"], killed, *common)]) == 130
    monkeypatch.setattr(trainer_mod, "_to_device", real)
    assert not (killed / "model_final.pth").exists()
    assert (killed / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    assert main(["--config-file", CONFIG, "--resume", *tiny_opts(data["train"], killed, *common)]) == 0
    a = load_checkpoint(str(straight / "model_final.pth"))
    b = load_checkpoint(str(killed / "model_final.pth"))
    assert a["iteration"] == b["iteration"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la = [json.loads(l) for l in open(straight / "metrics.json")]
    lb = [json.loads(l) for l in open(killed / "metrics.json")]
    assert [r["iter"] for r in lb] == [1, 2, 3, 4, 5, 6]  # the killed run's extra lines dropped
    assert [r["total_loss"] for r in la] == [r["total_loss"] for r in lb]


def test_outputs_checkpoint_contents_and_load_model(data, tmp_path):
    out = tmp_path / "run"
    rc = main(["--config-file", CONFIG, *tiny_opts(data["train"], out, "SOLVER.MAX_ITER", "4",
                                                   "SOLVER.CHECKPOINT_PERIOD", "2",
                                                   "SOLVER.LR_SCHEDULER", "step",
                                                   "SOLVER.STEPS", "[3]", test=data["val"])])
    assert rc == 0
    names = set(os.listdir(out))
    assert {"config.yaml", "metrics.json", "model_0000002.pth", "model_0000004.pth",
            "model_final.pth", "model_best.pth", "last_checkpoint", "eval_0000004.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    # --resume continues from the full state; model_final.pth holds what inference needs
    assert (out / "last_checkpoint").read_text().strip() == "model_0000004.pth"
    assert {"optimizer", "scheduler", "rng"} <= set(load_checkpoint(str(out / "model_0000004.pth")))
    lines = [json.loads(l) for l in open(out / "metrics.json")]
    train_lines = [l for l in lines if "total_loss" in l]
    assert [l["iter"] for l in train_lines] == [1, 2, 3, 4]
    for key in ("loss_mask", "loss_objectness", "lr", "time", "data_time", "memory_mb"):
        assert key in train_lines[0]
    assert train_lines[3]["lr"] < train_lines[1]["lr"]  # step schedule (GAMMA 0.1 at 3)
    ev = json.load(open(out / "eval_0000004.json"))["metrics"]["val"]
    for key in ("precision", "recall", "f1", "AP", "AP50", "dsb_score"):
        assert key in ev
    ck = load_checkpoint(str(out / "model_final.pth"))
    assert ck["classes"] == [{"id": 7, "name": "nucleus"}] and ck["mpp"] == 0.5
    assert {"model", "config", "classes", "mpp", "iteration"} <= set(ck)
    assert not {"optimizer", "scheduler", "scaler", "rng"} & set(ck)
    model, cfg, classes, mpp = load_model(str(out / "model_final.pth"))
    assert not model.training and classes[0]["id"] == 7 and mpp == 0.5
    assert cfg.MODEL.BACKBONE.OUT_CHANNELS == 32
    with torch.no_grad():
        inst = model([torch.rand(3, 40, 50)])[0]
    assert inst.image_size == (40, 50)


def test_eval_only_prints_metrics_and_writes_predictions(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config-file", CONFIG, *tiny_opts(data["train"], out, "SOLVER.MAX_ITER", "1")]) == 0
    ev = tmp_path / "ev"
    rc = main(["--config-file", CONFIG, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"),
               "DATASETS.TEST", f"[{data['val']}]", "OUTPUT_DIR", str(ev)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "precision" in printed and "val" in printed
    preds = json.load(open(ev / "predictions_val.json"))
    assert isinstance(preds, list) and all({"image_id", "bbox", "score"} <= set(p) for p in preds)
    assert (ev / "eval_final.json").is_file()


def test_time_limit_stops_and_saves_the_iteration_reached(data, tmp_path):
    out = tmp_path / "run"
    assert main(["--config-file", CONFIG, *tiny_opts(data["train"], out, "SOLVER.MAX_ITER", "50",
                                                     "SOLVER.TIME_LIMIT_MINUTES", "0.00001")]) == 0
    assert load_checkpoint(str(out / "model_final.pth"))["iteration"] == 1


def test_non_finite_loss_stops_with_iteration_losses_and_advice(data, tmp_path):
    cfg = get_cfg(CONFIG, tiny_opts(data["train"], tmp_path / "run", "SOLVER.MAX_ITER", "3"))
    trainer = Trainer(cfg)

    class NanMask(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images, targets):
            losses = self.inner(images, targets)
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
            return losses

    trainer.model = NanMask(trainer.model)
    with pytest.raises(TrainingError) as e:
        trainer.train()
    msg = str(e.value)
    assert "iteration 1" in msg and "loss_mask=nan" in msg and "BASE_LR" in msg


@pytest.mark.parametrize("case", ["missing_image", "unknown_category", "empty", "typo",
                                  "maskrcnn_on_boxes", "batch_vs_processes"])
def test_bad_input_is_a_clear_error_before_training(case, data, tmp_path, capsys):
    from detector.data.coco import new_coco, save_coco

    train = data["train"]
    extra = []
    if case == "missing_image":
        train = make_disc_coco(str(tmp_path), n_images=2, name="t.json")
        os.unlink(tmp_path / "img" / "t_1.png")
        expect = ["t_1.png", "missing", "image root"]
    elif case == "unknown_category":
        val = make_disc_coco(str(tmp_path), n_images=1, name="v.json",
                             category={"id": 2, "name": "mitosis"})
        extra = ["DATASETS.TEST", f"[{val}]"]
        expect = ["v.json", "2:mitosis", "categories"]
    elif case == "empty":
        train = str(tmp_path / "e.json")
        save_coco(new_coco([{"id": 1, "name": "nucleus"}], "."), train)
        expect = ["e.json", "empty"]
    elif case == "typo":
        extra = ["SOLVER.BASE_RL", "0.1"]
        expect = ["SOLVER.BASE_RL", "unknown config key"]
    elif case == "batch_vs_processes":
        extra = ["SOLVER.IMS_PER_BATCH", "3"]
        expect = ["IMS_PER_BATCH 3", "--num-gpus 2", "divisible"]
    else:
        train = make_disc_coco(str(tmp_path), n_images=2, name="b.json", masks=False)
        expect = ["FasterRCNN"]
    out = tmp_path / "out"
    gpus = ["--num-gpus", "2"] if case == "batch_vs_processes" else []
    rc = main(["--config-file", CONFIG, *gpus, *tiny_opts(train, out, "SOLVER.MAX_ITER", "2"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "Traceback" not in err
    for word in expect:
        assert word in err, (word, err)
    assert not (out / "model_final.pth").exists() and not (out / "metrics.json").exists()


def test_tools_script_runs_as_documented(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--help"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--resume" in r.stdout and "--num-gpus" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
                        "--config-file", "nope.yaml"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "config file not found: nope.yaml" in r.stderr


def test_lr_schedule_warmup_step_and_cosine():
    cfg = get_cfg(None, ["SOLVER.WARMUP_ITERS", "10", "SOLVER.WARMUP_FACTOR", "0.1",
                         "SOLVER.MAX_ITER", "100", "SOLVER.LR_SCHEDULER", "cosine"])
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 5) == pytest.approx((0.1 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert lr_factor(cfg, 50) == pytest.approx(0.5)
    assert lr_factor(cfg, 100) == pytest.approx(0.0)
    cfg = get_cfg(None, ["SOLVER.WARMUP_ITERS", "0", "SOLVER.LR_SCHEDULER", "step",
                         "SOLVER.STEPS", "[10, 20]", "SOLVER.GAMMA", "0.1"])
    assert [lr_factor(cfg, i) for i in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_sampler_stream_is_a_function_of_seed_and_position():
    full = TrainingSampler(5, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(12)]
    assert sorted(i for i, _ in stream[:5]) == list(range(5))  # an epoch is a permutation
    assert sorted(i for i, _ in stream[5:10]) == list(range(5))
    resumed = iter(TrainingSampler(5, seed=3, start=7))
    assert [next(resumed) for _ in range(5)] == stream[7:12]
    r0, r1 = iter(TrainingSampler(5, 3, 0, 0, 2)), iter(TrainingSampler(5, 3, 0, 1, 2))
    assert [next(r0) for _ in range(3)] == stream[0:6:2]
    assert [next(r1) for _ in range(3)] == stream[1:6:2]


def test_schedule_by_time_anneals_within_the_time_budget(data, tmp_path):
    """SOLVER.SCHEDULE_BY_TIME: a run stopped by its time limit long before MAX_ITER has still
    brought the cosine LR down to about 0, and its checkpoint records the training time."""
    cfg = get_cfg(None, ["SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", "1000"])
    assert lr_factor(cfg, 10, time_progress=0.5) == pytest.approx(0.5)   # time is further
    assert lr_factor(cfg, 900, time_progress=0.5) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 0.9)))                              # iterations are
    assert lr_factor(cfg, 10, time_progress=3.0) == pytest.approx(0.0)
    out = tmp_path / "run"
    assert main(["--config-file", CONFIG, *tiny_opts(
        data["train"], out, "SOLVER.MAX_ITER", "100000", "SOLVER.TIME_LIMIT_MINUTES", "0.15",
        "SOLVER.SCHEDULE_BY_TIME", "true")]) == 0
    ckpt = load_checkpoint(str(out / "model_final.pth"))
    assert 1 < ckpt["iteration"] < 100000
    with open(out / "metrics.json") as f:
        lrs = [json.loads(line)["lr"] for line in f if '"lr"' in line]
    base = 0.0006  # the config's BASE_LR
    assert max(lrs) > 0.5 * base and lrs[-1] < 0.1 * base
    periodic = load_checkpoint(str(out / f"model_{ckpt['iteration']:07d}.pth"))
    assert periodic["extra"]["train_seconds"] == pytest.approx(9.0, abs=3.0)
