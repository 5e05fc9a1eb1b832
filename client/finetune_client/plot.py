"""Loss curves from a job's history.jsonl: a PNG (matplotlib, imported only here) or a plot in the terminal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Points = list[tuple[int, float]]


def loss_series(history: list[dict[str, Any]]) -> tuple[Points, Points]:
    """(step, loss) and (step, eval loss) points of a history, in step order."""
    train = [(int(e["step"]), float(e["loss"])) for e in history if isinstance(e.get("loss"), int | float)]
    evaluation = [(int(e["step"]), float(e["evalLoss"])) for e in history if isinstance(e.get("evalLoss"), int | float)]
    return sorted(train), sorted(evaluation)


def terminal_plot(history: list[dict[str, Any]], width: int = 64, height: int = 16) -> str:
    """Train loss (``*``) and eval loss (``o``) against step on a character grid with labelled axes."""
    train, evaluation = loss_series(history)
    points = [p for p in train + evaluation if math.isfinite(p[1])]
    if not points:
        return "no losses logged yet"
    low_step, high_step = min(s for s, _ in points), max(s for s, _ in points)
    low, high = min(v for _, v in points), max(v for _, v in points)
    grid = [[" "] * width for _ in range(height)]
    for series, mark in ((train, "*"), (evaluation, "o")):
        for step, value in series:
            x = 0 if high_step == low_step else round((step - low_step) / (high_step - low_step) * (width - 1))
            y = 0 if high == low else round((value - low) / (high - low) * (height - 1))
            grid[height - 1 - y][x] = mark
    label_width = max(len(f"{high:.3f}"), len(f"{low:.3f}"))
    rows = []
    for index, row in enumerate(grid):
        label = f"{high:.3f}" if index == 0 else f"{low:.3f}" if index == height - 1 else ""
        rows.append(f"{label:>{label_width}} |{''.join(row)}")
    rows.append(" " * label_width + " +" + "-" * width)
    rows.append(" " * label_width + f"  {low_step:<{width // 2}}{high_step:>{width - width // 2}}")
    rows.append(" " * label_width + "  step   * train loss   o eval loss")
    return "\n".join(rows)


def save_png(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Train and eval loss against step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evaluation = loss_series(history)
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if train:
            axes.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
        if evaluation:
            axes.plot(*zip(*evaluation, strict=True), label="eval loss", color="tab:orange", marker="o")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path
