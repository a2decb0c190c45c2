"""The run's curves: training loss and accuracy, held-out accuracy, and the DynamicConv temperature."""

from __future__ import annotations

from pathlib import Path

# The object-oriented API renders straight to a file with Agg: no display needed, and importing this
# module does not change pyplot's backend for anyone else (a notebook, say).
from matplotlib.figure import Figure


def plot_history(history: dict[str, list[list[float]]], path: str | Path, title: str) -> Path:
    """Write a two-panel PNG (loss with temperature; accuracies) of ``FitResult.history`` to ``path``."""
    train = list(zip(*history["train"], strict=True)) if history["train"] else [[], [], [], []]
    evals = list(zip(*history["eval"], strict=True)) if history["eval"] else [[], []]
    steps, loss, accuracy, temperature = train
    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(steps, loss, color="tab:blue", label="train loss")
    loss_ax.set(xlabel="step", ylabel="cross-entropy", title="loss")
    temp_ax = loss_ax.twinx()
    temp_ax.plot(steps, temperature, color="tab:gray", linestyle="--", label="DynamicConv temperature")
    temp_ax.set_ylabel("temperature")
    loss_ax.legend(handles=loss_ax.lines + temp_ax.lines, loc="upper right")
    acc_ax.plot(steps, accuracy, color="tab:blue", alpha=0.6, label="train batches (train mode)")
    acc_ax.plot(evals[0], evals[1], color="tab:red", marker="o", label="held-out set (eval mode)")
    acc_ax.axhline(0.1, color="tab:gray", linestyle=":", label="chance (10 classes)")
    acc_ax.set(xlabel="step", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    acc_ax.legend(loc="lower right")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
