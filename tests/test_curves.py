"""Training curves exported from TensorBoard scalars."""
import numpy as np
from torch.utils.tensorboard import SummaryWriter

from detector.cli.plot_curves import main
from detector.engine.curves import ema, load_scalars


def write_run(folder, n=30, resumed=False):
    w = SummaryWriter(log_dir=str(folder))
    for it in range(1, n + 1):
        w.add_scalar("train/total_loss", 2.0 / it, it)
        w.add_scalar("train/lr", 0.01, it)
    w.add_scalar("eval/dsb_val/f1", 0.4, 10)
    w.add_scalar("eval/dsb_val/f1", 0.6, 20)
    w.close()


def test_load_and_plot(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    s = load_scalars(str(run))
    steps, vals = s["eval/dsb_val/f1"]
    assert list(steps) == [10, 20] and np.allclose(vals, [0.4, 0.6])
    assert len(s["train/total_loss"][0]) == 30
    out = tmp_path / "curves.png"
    assert main(["--run", f"A={run}", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert main(["--run", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    empty = tmp_path / "empty"; empty.mkdir()
    assert main(["--run", str(empty), "--out", str(out)]) == 2


def test_ema_smooths_toward_values():
    v = np.array([1.0, 0.0, 0.0, 0.0])
    e = ema(v, 0.5)
    assert e[0] == 1.0 and np.allclose(e, [1.0, 0.5, 0.25, 0.125])
