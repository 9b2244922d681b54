"""``LinearizeConfig``: how :func:`slimtune.linear_attention.linearize` replaces softmax attention.

Fields (validated in ``__post_init__``; a bad value raises ConfigError naming the field, the value and what is
allowed):

- ``feature_map``: a name in ``FEATURE_MAPS`` ("dijiang", "dijiang_official", "dijiang_qmc", "performer",
  "hedgehog").
- ``m``: feature size per head; None means head_dim.
- ``stabilizer``: how the exponential maps' per-token shift is handled (``feature_maps``): "exact" (default) undoes
  it inside the attention, with one running maximum per sequence in the state (``ops``), so the attention uses the
  kernel estimate φ(q)·φ(k) ≈ exp(q·k/√d) itself; "per_token" keeps it, which reweights every key by exp(−its
  shift) (what folders saved before this field existed were trained with, and what ``load_linearized`` assumes
  for them).
- ``op``: the prefill/training op, a name in ``LINEAR_ATTENTION_OPS`` ("chunked", "reference", "recurrent",
  "fla"); cached decoding of one token always uses "recurrent".
- ``chunk_size``: chunk length of the "chunked" op.
- ``decay``: a learnable per-head decay γ (RetNet / official DiJiang), initialised in [1 − 1/32, 1 − 1/512].
- ``normalize``: divide by φ(q)·Σφ(k) (the linear-attention normaliser); the official DiJiang has none.
- ``output_gate``: the official DiJiang output ``o_proj(swish(x W_G) ⊙ GroupNorm(o))``; randomly initialised,
  so the converted model starts further from the original (off by default).
- ``share_feature_map``: one map for queries and keys (DiJiang, a kernel estimate φ(q)·φ(k) ≈ exp(q·k)), or
  two maps started equal and trained apart (as LoLCATs' learned maps).
- ``window``: 0 for pure linear attention (DiJiang); w > 0 for LoLCATs' hybrid (``window.py``): the last w
  keys of each query are read with exact softmax weights and only older keys through the feature map, which
  recovers quality far faster. Needs ``normalize=True``. Cost and state stay linear / constant in T.
- ``sink_tokens``: with a window, the first n keys are always read with softmax weights too (StreamingLLM's
  attention sinks); they never enter the linear state.
- ``window_mix``: with a window, the initial per-head weight g of the linear part against the softmax part
  (learned as log g; g absorbs the scale between the two forms).
- ``seed``: seeds the random parts (feature-map frequencies, gate weights); layer i uses ``seed + i``.
- ``softmax_layers``: indices of attention layers (0 = the first) left as the original softmax attention, the
  others being converted (a layer-selective hybrid; ``slimtune.training.rank_softmax_layers`` ranks the candidates).
  None (default): every layer is converted. An index must be below the model's layer count (checked by linearize).
"""

from __future__ import annotations

import dataclasses

from slimtune.config import DictConfig, check_bool, check_choice, check_int, check_int_list, check_number
from slimtune.errors import ConfigError
from slimtune.linear_attention.feature_maps import FEATURE_MAPS
from slimtune.linear_attention.ops import LINEAR_ATTENTION_OPS

STABILIZERS = ("exact", "per_token")


@dataclasses.dataclass
class LinearizeConfig(DictConfig):
    """Settings of a softmax → linear attention conversion (module docstring)."""

    feature_map: str = "dijiang"
    m: int | None = None
    stabilizer: str = "exact"
    op: str = "chunked"
    chunk_size: int = 64
    decay: bool = True
    normalize: bool = True
    output_gate: bool = False
    share_feature_map: bool = True
    window: int = 0
    sink_tokens: int = 0
    window_mix: float = 0.1
    seed: int = 0
    softmax_layers: list[int] | None = None

    def __post_init__(self) -> None:
        check_choice("feature_map", self.feature_map, tuple(sorted(FEATURE_MAPS)))
        check_int("m", self.m, optional=True)
        if self.feature_map == "hedgehog" and self.m is not None and self.m % 2:
            raise ConfigError(f"m={self.m!r} is not allowed with feature_map='hedgehog': expected an even int")
        check_choice("stabilizer", self.stabilizer, STABILIZERS)
        check_choice("op", self.op, tuple(sorted(LINEAR_ATTENTION_OPS)))
        check_int("chunk_size", self.chunk_size)
        for name in ("decay", "normalize", "output_gate", "share_feature_map"):
            check_bool(name, getattr(self, name))
        check_int("window", self.window, minimum=0)
        check_int("sink_tokens", self.sink_tokens, minimum=0)
        if self.sink_tokens and not self.window:
            raise ConfigError(f"sink_tokens={self.sink_tokens} is not allowed with window=0: sinks need a window >= 1")
        if self.window and not self.normalize:
            raise ConfigError(f"window={self.window} is not allowed with normalize=False: the hybrid is normalised")
        check_number("window_mix", self.window_mix, above=0)
        check_int("seed", self.seed, minimum=0)
        if isinstance(self.softmax_layers, tuple):
            self.softmax_layers = list(self.softmax_layers)
        check_int_list("softmax_layers", self.softmax_layers, optional=True)
