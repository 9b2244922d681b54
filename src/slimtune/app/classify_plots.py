"""The picture of a classifier's results: its confusion matrix as a PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from slimtune.errors import ConfigError
from slimtune.fileio import atomic_write


def plot_confusion(
    confusion: Sequence[Sequence[int]], names: Sequence[str], path: str | os.PathLike, title: str
) -> Path:
    """Write ``confusion[true][predicted]`` [C, C] as a PNG at ``path`` (atomically; Agg backend, no display).

    True classes are the rows, predicted ones the columns, both labelled with ``names``; each cell shows its
    count, coloured by its share of the row (of the examples of that true class), so classes of different
    sizes read alike.

    Raises:
        ConfigError: ``confusion`` is not square with one row per name, or holds a negative count.
    """
    from matplotlib.figure import Figure

    size = len(names)
    if size == 0 or len(confusion) != size or any(len(row) != size for row in confusion):
        shape = [len(row) for row in confusion]
        raise ConfigError(
            f"confusion with rows of lengths {shape} and {size} names is not allowed: expected {size} rows of "
            f"{size} counts, one per name, with at least one name"
        )
    if any(count < 0 for row in confusion for count in row):
        raise ConfigError(f"confusion={[list(row) for row in confusion]} is not allowed: expected counts >= 0")
    shares = [[count / max(1, sum(row)) for count in row] for row in confusion]  # [C, C], each row sums to 1 or 0
    side = max(4.0, 0.7 * size + 2.5)
    figure = Figure(figsize=(side + 1.0, side), dpi=110)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for true, row in enumerate(confusion):
        for predicted, count in enumerate(row):
            colour = "white" if shares[true][predicted] > 0.5 else "black"
            axes.text(predicted, true, str(count), ha="center", va="center", color=colour, fontsize=9)
    axes.set_xticks(range(size), list(names), rotation=45, ha="right")
    axes.set_yticks(range(size), list(names))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="share of the true class")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    return Path(path)
