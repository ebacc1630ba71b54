"""Training curves: TensorBoard scalars of one or several runs, exported as a PNG.

TensorBoard is the place to watch a run live; this gives the picture to keep beside the results
(``docs/results/``) without a TensorBoard server.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

Series = Tuple[np.ndarray, np.ndarray]

# (panel title, TensorBoard tag suffix or exact tag, smooth?)
DEFAULT_PANELS: Sequence[Tuple[str, str, bool]] = (
    ("training loss", "train/total_loss", True),
    ("learning rate", "train/lr", False),
    ("validation F1 @ IoU 0.5", "/f1", False),
    ("validation AP", "/AP", False),
)


def load_scalars(run_dir: str) -> Dict[str, Series]:
    """All scalar series of the TensorBoard event files in ``run_dir``: tag -> (steps, values),
    sorted by step (the last value wins when a resumed run wrote a step twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    out: Dict[str, Series] = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def ema(values: np.ndarray, weight: float = 0.8) -> np.ndarray:
    """Exponential moving average, as TensorBoard's smoothing slider."""
    out = np.empty_like(values)
    acc = values[0] if len(values) else 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc
    return out


def _find(scalars: Dict[str, Series], key: str) -> List[str]:
    if key in scalars:
        return [key]
    return sorted(t for t in scalars if t.startswith("eval/") and t.endswith(key))


def plot_training_curves(runs: Dict[str, str], out_png: str,
                         panels: Sequence[Tuple[str, str, bool]] = DEFAULT_PANELS) -> List[str]:
    """Draw one panel per entry of ``panels`` with a line per run (and per evaluated data set)
    and save ``out_png``. Returns the panels that had data. Raises ValueError when no run has
    any of the scalars (e.g. a wrong folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {name: load_scalars(d) for name, d in runs.items()}
    if not any(data.values()):
        raise ValueError(f"no TensorBoard scalars found in {list(runs.values())}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    axes = np.atleast_1d(axes)
    drawn = []
    for ax, (title, key, smooth) in zip(axes, panels):
        for name, scalars in data.items():
            for tag in _find(scalars, key):
                steps, vals = scalars[tag]
                label = name if tag == key else f"{name} ({tag.split('/')[1]})"
                if smooth and len(vals) > 3:
                    ax.plot(steps, vals, alpha=0.25, lw=0.8)
                    ax.plot(steps, ema(vals), lw=1.5, label=label, color=ax.lines[-1].get_color())
                else:
                    ax.plot(steps, vals, marker="o" if len(vals) < 15 else None, ms=3, lw=1.5,
                            label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            drawn.append(title)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return drawn
