"""Scheduled sliding-window dropout (SSD, arXiv 2510.05901) for recovery training of hybrid linear attention.

A hybrid layer (``LinearizeConfig.window`` = w > 0) reads its last w keys with exact softmax weights and older keys
through the linear branch. Trained as is, it can lower the loss through the window alone and leave the linear
branch unused, the "component collapse" the paper diagnoses; SSD suppresses the softmax window at random during
training so that the linear branch has to carry the context.

Schedule (the paper gives the idea, a scheduled probability of dropping the window; this linear decay is our
choice): at step s of S, each windowed layer independently runs as pure linear attention over all keys
(``LinearAttention.drop_window``, which acts in training mode only) with probability

    p(s) = p0 · (1 − s / S)

from p0 at the first step down towards 0 at the last, so that training ends on the hybrid the model runs at
inference. The draws of step s come from NumPy's generator seeded with the pair (seed, s) (a ``SeedSequence``, which
mixes both; a torch CPU generator would keep only the low 32 bits of one combined seed): they depend only on the
seed and the step, so a resumed run drops the same windows as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
from torch import nn

from slimtune.config import check_int, check_number
from slimtune.errors import ConfigError
from slimtune.linear_attention.convert import linear_attention_layers


def dropout_probability(p0: float, step: int, steps: int) -> float:
    """p(step) = p0 · (1 − step / steps): the chance that a windowed layer drops its window at ``step`` (0-based)."""
    return p0 * (1.0 - step / steps)


def dropped_windows(p0: float, step: int, steps: int, layers: int, seed: int) -> list[bool]:
    """For each of ``layers`` windowed layers, whether it drops its window at ``step``: drawn from (seed, step)."""
    draws = np.random.default_rng([seed, step]).random(layers)
    return [bool(draw < dropout_probability(p0, step, steps)) for draw in draws]


@contextlib.contextmanager
def window_dropout(model: nn.Module, p0: float, steps: int, seed: int = 0) -> Iterator[Callable[[int], None] | None]:
    """Yields the loop's ``before_step(step)``, which sets every windowed layer's ``drop_window`` for that step
    (None when ``p0`` is 0); every ``drop_window`` is False again on exit, however the block ends.

    Raises:
        ConfigError: ``p0`` not in [0, 1), ``seed`` negative, or ``p0`` > 0 and no LinearAttention of ``model`` has
            a softmax window.
    """
    check_number("window_dropout", p0, at_least=0, below=1)
    check_int("seed", seed, minimum=0)
    if p0 == 0:
        yield None
        return
    layers = [layer for _, layer in linear_attention_layers(model) if layer.config.window]
    if not layers:
        raise ConfigError(
            f"window_dropout={p0} is not allowed for this {type(model).__name__}: it has no LinearAttention layer with "
            "a softmax window; linearize with window > 0 (--window W), or set window_dropout=0"
        )

    def before_step(step: int) -> None:
        for layer, drop in zip(layers, dropped_windows(p0, step, steps, len(layers), seed)):
            layer.drop_window = drop

    try:
        yield before_step
    finally:
        for layer in layers:
            layer.drop_window = False
