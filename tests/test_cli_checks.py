"""What users rely on at the command line: infer_tiles.py's argument checks (exit 2 naming the
flag, before any slide is touched), exit 1 when one input fails beside good ones, the OSError
-> exit 2 paths of convert, evaluate and the demo, and ``python tools/*.py`` as the README
shows them."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from detector.data.coco import image_entry, mask_annotation, new_coco, save_coco
from tests.conftest import shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = [{"id": 1, "name": "nucleus"}]
MONUSEG = ("monuseg", "TCGA-2Z-A9J9-01A-01-TS1.tif")


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory):
    """A small randomly initialised U-Net of ours, trained at 1 um/px (cheap to load and run)."""
    from detector.config.config import get_cfg
    from detector.engine.checkpoint import save_checkpoint
    from detector.modeling.build import build_model

    torch.manual_seed(0)
    cfg = get_cfg(None, ["MODEL.META_ARCHITECTURE", "UNet", "MODEL.UNET.DEPTH", "2",
                         "MODEL.UNET.BASE_CHANNELS", "4"])
    path = str(tmp_path_factory.mktemp("ckpt") / "unet.pth")
    save_checkpoint(path, build_model(cfg, CLASSES), cfg, CLASSES, 1.0, 0)
    return path


@pytest.mark.parametrize("flags,message", [
    (["--tile-size", "0"], "--tile-size must be > 0"),
    (["--tile-size", "-64"], "--tile-size must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--streams", "0"], "--streams must be > 0"),
    (["--tile-size", "256", "--overlap", "256"], "--overlap must be >= 0 and < --tile-size"),
    (["--overlap", "-1"], "--overlap must be >= 0"),
    (["--mpp", "0"], "--mpp must be > 0"),
    (["--mpp", "-0.25"], "--mpp must be > 0"),
    (["--hpf-area", "0"], "--hpf-area must be > 0"),
    (["--hotspot-area", "-2"], "--hotspot-area must be > 0"),
    (["--roi", "100,100,50,400"], "the box must be x0,y0,x1,y1"),
    (["--roi", "no_such_roi.geojson"], "neither a box"),
    (["--mitotic-classes", "mitosis"], "'mitosis' is not a class of the checkpoint"),
])
def test_infer_tiles_rejects_bad_arguments_with_exit_2(flags, message, unet_checkpoint,
                                                       tmp_path, caplog):
    from detector.cli.infer_tiles import main

    out = tmp_path / "out"
    rc = main(["--weights", unet_checkpoint, "--input", str(shared_path(*MONUSEG)),
               "--output", str(out), "--mpp", "0.25", "--quiet", "--num-workers", "0"] + flags)
    assert rc == 2 and message in caplog.text
    assert not (out / "TCGA-2Z-A9J9-01A-01-TS1").exists()  # no slide was started


def test_infer_tiles_unknown_hotspot_shape_is_a_usage_error(unet_checkpoint, tmp_path, capsys):
    from detector.cli.infer_tiles import main

    with pytest.raises(SystemExit) as e:
        main(["--weights", unet_checkpoint, "--input", "x.svs", "--output", str(tmp_path),
              "--hotspot-shape", "hexagon"])
    assert e.value.code == 2 and "--hotspot-shape" in capsys.readouterr().err


def test_infer_tiles_exit_1_when_one_input_fails_beside_a_good_one(unet_checkpoint, tmp_path,
                                                                   caplog, capsys):
    from detector.cli.infer_tiles import main

    good = str(shared_path(*MONUSEG))
    out = tmp_path / "out"
    common = ["--weights", unet_checkpoint, "--output", str(out), "--mpp", "0.25",
              "--tile-size", "128", "--overlap", "32", "--quiet", "--num-workers", "0",
              "--device", "cpu"]
    # a missing file beside the good slide: the good one is analysed, the run exits 1
    rc = main(["--input", good, str(tmp_path / "missing.tif")] + common)
    printed = capsys.readouterr().out
    assert rc == 1 and "1 analysed" in printed and "1 failed" in printed
    assert "FAILED" in printed and "missing.tif" in printed
    assert (out / "TCGA-2Z-A9J9-01A-01-TS1" / "summary.json").is_file()
    # a pattern that matches nothing beside it: still exit 1 (the good slide is resumed)
    rc = main(["--input", good, str(tmp_path / "nothing_*.svs"), "--resume"] + common)
    assert rc == 1 and "matched no slide" in caplog.text
    assert "1 already finished" in capsys.readouterr().out
    # the good slide alone: 0
    assert main(["--input", good, "--resume"] + common) == 0


def _blocked(tmp_path):
    """A path whose parent is a regular file: creating it fails with an OSError."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker


def test_convert_exits_2_on_an_unwritable_output(tmp_path, capsys):
    from detector.cli.convert_to_coco import main
    from tests.test_convert_formats import make_dsb

    make_dsb(tmp_path / "dsb")
    target = _blocked(tmp_path) / "out.json"
    rc = main(["--format", "dsb", "--input", str(tmp_path / "dsb"), "--output", str(target),
               "--workers", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "blocker" in lines[0], err


def test_evaluate_exits_2_on_an_unwritable_out(tmp_path, capsys):
    from detector.cli.evaluate import main

    coco = new_coco(CLASSES, str(tmp_path))
    coco["images"].append(image_entry(1, "a.png", 32, 32))
    m = np.zeros((32, 32), bool)
    m[4:12, 6:14] = True
    coco["annotations"].append(mask_annotation(m, 1, 1))
    save_coco(coco, str(tmp_path / "gt.json"))
    from detector.data.coco import load_coco

    gt = load_coco(str(tmp_path / "gt.json"))
    pred = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0,
             "segmentation": a["segmentation"]} for a in gt["annotations"]]
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    rc = main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
               "--out", str(_blocked(tmp_path) / "report"), "--bootstrap", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "blocker" in lines[0], err


def test_demo_exits_2_on_an_unwritable_out(tmp_path, capsys):
    import detector.demo as demo

    rc = demo.main(["--quick", "--out", str(_blocked(tmp_path) / "demo")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "blocker" in err, err


TOOLS = sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py"))
# a flag only that tool has: the script runs its own CLI
FLAGS = {"convert_to_coco.py": "--format", "evaluate.py": "--gt", "infer_tiles.py": "--weights",
         "mitosis_stage2.py": "bundle", "plot_curves.py": "--run", "train_net.py": "--config-file"}


def test_tools_run_as_scripts(tmp_path):
    """``python tools/<tool>.py`` from the project root, as the README shows: convert_to_coco.py
    --help and evaluate.py with bad input (exit 2, the file named, no traceback) as scripts of
    their own (they start without torch), and every tool's --help run as ``__main__`` in one
    more interpreter (one torch import, about 10 s of CPU on a loaded 2-core machine)."""
    assert set(FLAGS) == set(TOOLS), "name a flag of each tool in FLAGS"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    missing = str(tmp_path / "nope.json")
    each = textwrap.dedent(f"""
        import contextlib, io, runpy, sys
        for tool in {TOOLS!r}:
            sys.argv = [tool, "--help"]
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    runpy.run_path("tools/" + tool, run_name="__main__")
                code = None
            except SystemExit as e:
                code = e.code
            print(tool, code, out.getvalue().split()[:2] == ["usage:", tool],
                  {FLAGS!r}[tool] in out.getvalue())
    """)
    runs = {"convert": [os.path.join("tools", "convert_to_coco.py"), "--help"],
            "bad input": [os.path.join("tools", "evaluate.py"), "--gt", missing, "--pred",
                          missing],
            "each": ["-c", each]}
    procs = {k: subprocess.Popen([sys.executable] + argv, cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, argv in runs.items()}
    done = {k: (p.communicate(timeout=300), p.returncode) for k, p in procs.items()}
    (out, err), rc = done["convert"]
    assert rc == 0 and out.startswith("usage: convert_to_coco.py") and "--format" in out, err
    (out, err), rc = done["bad input"]
    assert rc == 2 and "nope.json" in err and "Traceback" not in err
    (out, err), rc = done["each"]
    assert rc == 0, err[-2000:]
    assert len(TOOLS) >= 5
    assert out.split("\n")[:len(TOOLS)] == [f"{t} 0 True True" for t in TOOLS], out
