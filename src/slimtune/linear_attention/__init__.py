"""Linear attention: feature maps, causal linear-attention ops, conversion of HF models, cache and recovery training.

``linearize(model, LinearizeConfig(...))`` swaps softmax attention for :class:`LinearAttention` in place;
:mod:`slimtune.training.recovery` recovers quality (attention transfer, then fine-tuning); generation runs on a
constant-size
:class:`LinearAttentionCache`. ``LinearizeConfig(window=w, sink_tokens=n)`` keeps exact softmax attention over the
last w (and first n) keys and reads only older keys through the feature map (``window.py``).
``LinearizeConfig(softmax_layers=[...])`` leaves the listed layers as softmax attention (a layer-selective hybrid);
:func:`restore_softmax` / :func:`softmax_restored` give linearised layers their softmax attention back.
"""

from slimtune.linear_attention.cache import LinearAttentionCache, LinearAttentionCacheLayer, cache_nbytes
from slimtune.linear_attention.config import LinearizeConfig
from slimtune.linear_attention.convert import (
    SUPPORTED_ATTENTION,
    linear_attention_layers,
    linear_attention_parameters,
    linearize,
    linearize_config,
    load_linearized,
    save_linearized,
)
from slimtune.linear_attention.feature_maps import (
    FEATURE_MAPS,
    DiJiangFeatureMap,
    DiJiangOfficialFeatureMap,
    FeatureMap,
    HedgehogFeatureMap,
    PerformerFeatureMap,
    build_feature_map,
)
from slimtune.linear_attention.layer import AttentionSpec, LinearAttention
from slimtune.linear_attention.ops import (
    LINEAR_ATTENTION_OPS,
    LinearAttentionOptions,
    LinearAttentionState,
    fla_available,
    get_linear_attention_op,
    linear_attention_chunked,
    linear_attention_fla,
    linear_attention_recurrent,
    linear_attention_reference,
)
from slimtune.linear_attention.restore import restore_softmax, softmax_restored
from slimtune.linear_attention.window import (
    WindowOptions,
    WindowState,
    sliding_window_linear_attention,
    sliding_window_linear_attention_reference,
)

__all__ = [
    "FEATURE_MAPS",
    "LINEAR_ATTENTION_OPS",
    "SUPPORTED_ATTENTION",
    "AttentionSpec",
    "DiJiangFeatureMap",
    "DiJiangOfficialFeatureMap",
    "FeatureMap",
    "HedgehogFeatureMap",
    "LinearAttention",
    "LinearAttentionCache",
    "LinearAttentionCacheLayer",
    "LinearAttentionOptions",
    "LinearAttentionState",
    "LinearizeConfig",
    "PerformerFeatureMap",
    "WindowOptions",
    "WindowState",
    "build_feature_map",
    "cache_nbytes",
    "fla_available",
    "get_linear_attention_op",
    "linear_attention_chunked",
    "linear_attention_fla",
    "linear_attention_layers",
    "linear_attention_parameters",
    "linear_attention_recurrent",
    "linear_attention_reference",
    "linearize",
    "linearize_config",
    "load_linearized",
    "restore_softmax",
    "save_linearized",
    "sliding_window_linear_attention",
    "sliding_window_linear_attention_reference",
    "softmax_restored",
]
