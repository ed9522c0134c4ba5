"""The loss-curve picture saved with every trained model (and sent to admins after a retrain)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_loss_curve(path: str | Path, train: Sequence[tuple[int, float]], valid: Sequence[tuple[int, float]],
                    title: str = "") -> Path:
    """Train and validation loss against optimizer step, as a PNG.

    Uses the Agg canvas directly (no pyplot), so it works headless and from any thread
    without touching matplotlib's global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot([s for s, _ in train], [loss for _, loss in train], label="train", color="tab:blue", alpha=0.7)
    if valid:
        ax.plot([s for s, _ in valid], [loss for _, loss in valid], label="valid", color="tab:orange", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or valid:
        ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return Path(path)
