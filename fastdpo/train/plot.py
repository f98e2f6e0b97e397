"""A PNG of a run's metrics JSONL: loss, reward margin and preference accuracy over steps."""

from __future__ import annotations

import json
import os
import pathlib


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """``(step_lines, eval_lines)`` of a metrics JSONL written by :class:`fastdpo.DPOTrainer`."""
    steps, evals = [], []
    for line in pathlib.Path(path).read_text().splitlines():
        record = json.loads(line)
        (steps if "loss" in record else evals).append(record)
    return steps, evals


def plot_metrics(
    metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str = ""
) -> pathlib.Path:
    """Three panels over optimizer steps: loss; reward margin (with the chosen and rejected rewards);
    reward accuracy of each training batch, plus the evaluations on each split (implicit-reward and
    policy log-prob accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, evals = read_metrics(metrics_path)
    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(x, [r["loss"] for r in steps], color="C0")
    axes[0].set_title("DPO loss (training batches)")
    axes[1].plot(x, [r["rewards/margins"] for r in steps], color="C2", label="margin (chosen - rejected)")
    axes[1].plot(x, [r["rewards/chosen"] for r in steps], color="C0", lw=0.8, ls="--", label="chosen reward")
    axes[1].plot(
        x, [r["rewards/rejected"] for r in steps], color="C3", lw=0.8, ls="--", label="rejected reward"
    )
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[1].set_title("implicit reward  beta * (log pi - log ref)")
    axes[1].legend(fontsize=8)
    axes[2].plot(x, [r["rewards/accuracies"] for r in steps], color="C0", alpha=0.6, label="training batch")
    for split, color in (("train", "C1"), ("eval", "C3")):
        for metric, style, how in (
            ("rewards/accuracies", "-", "reward"),
            ("logps/accuracies", ":", "log-prob"),
        ):
            key = f"{split}_{metric}"
            points = [(e["step"], e[key]) for e in evals if key in e]
            if points:
                label = f"{'all training' if split == 'train' else 'held-out'} pairs, {how}"
                axes[2].plot(*zip(*points), marker="o", ms=4, color=color, ls=style, label=label)
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_title("accuracy (chosen ranked above rejected)")
    axes[2].legend(fontsize=7, loc="center right")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
