"""``LinearAttention``: a drop-in replacement for an HF softmax attention module, keeping its pretrained parts.

The original module's projections (and, for GPT-2, its residual dropout) become children of the new layer under
their original names, so the weights are the same tensors (not copies), state-dict keys do not change and
adapters still find ``q_proj`` etc. by name. What an architecture looks like (which children, how q/k/v come
out of them, the cache keyword, its RoPE function) is an :class:`AttentionSpec`, filled in by ``convert.py``.

Per token, for query head h (GQA: key/value heads are repeated to the H query heads, as HF's ``repeat_kv``):

    q, k = RoPE(q, k)                              (skipped without RoPE, e.g. GPT-2)
    φq, φk = φ(s·q), φ_k(s·k)                      s = d^(−1/4) for the exp-kernel maps, else 1
    o_t = Σ_{s≤t} γ^(t−s) (φq_t·φk_s) v_s  [/ Σ_{s≤t} γ^(t−s) φq_t·φk_s + eps]   (normalize)
    out = o_proj(o)  or  o_proj(swish(x W_G) ⊙ GroupNorm(o))                     (output_gate)

- s = d^(−1/4) on both q and k makes φ(q)·φ(k) estimate exp(q·k/√d), the softmax kernel, for the exp-kernel
  maps ("dijiang", "dijiang_qmc", "performer"). The softmax-over-features maps ("dijiang_official", "hedgehog")
  get the raw q, k, as in their reference code.
- Stabiliser of the exp maps (``config.stabilizer``): each token's features come out of the map divided by
  exp(max_j y_j), detached, with that shift beside them (``FeatureMap.features``).
  - "exact" (default): the shifts go to the op as log scales of the keys and queries, and the op keeps one running
    maximum per sequence and head in its state (``ops``), so the attention computes with φ(q)·φ(k) itself, the
    kernel estimate, at any length, and cached decoding still equals a full forward. With a window the linear part
    is then in the softmax part's units and ``window_mix`` = 1 weighs them as one softmax would.
  - "per_token": the shifts are dropped. For queries that cancels in the normaliser; for keys it reweights key s by
    c(k_s) = exp(−max_j y_j(k_s)), a per-key rescaling like the per-token softmax of the official DiJiang code and
    of Hedgehog; attention transfer trains the map's weights with the reweighting in place.
- γ = exp(−exp(θ_h)) per query head, θ learnable (``decay_log_rate``), so 0 < γ < 1 always; initialised as the
  official DiJiang code, 1 − γ geometric from 1/32 to 1/512 across heads.
- Window (``config.window`` = w > 0, LoLCATs' hybrid, ``window.py``): the last w keys (and the first
  ``sink_tokens``) are read with softmax weights exp(q·k·scale − max), scale = the original's ``scaling`` (else
  d^(−1/2)), older keys through the map above, weighted by g_h = exp(``window_mix_log``[h]); one normaliser.
- Window dropout (arXiv 2510.05901): while ``drop_window`` is True and the layer is in training mode (no cache),
  a windowed layer runs as pure linear attention over every key, so training must make the linear branch carry the
  context; recovery training sets it per step at random (``slimtune.training.recovery``).
- Padding: keys at positions the attention mask hides are zeroed (φk = 0), so left-padded batches decode right.

Prefill and training run ``config.op`` (chunked by default); with a cache, a one-token step runs the recurrent op
on the carried :class:`LinearAttentionState` (``cache.py``), whose size does not depend on the context length.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from slimtune.errors import ConfigError, ShapeError
from slimtune.linear_attention.cache import state_layer
from slimtune.linear_attention.config import LinearizeConfig
from slimtune.linear_attention.feature_maps import FEATURE_MAPS, FeatureMap, build_feature_map
from slimtune.linear_attention.op_args import LinearAttentionOptions
from slimtune.linear_attention.ops import get_linear_attention_op, linear_attention_recurrent
from slimtune.linear_attention.window import sliding_window_linear_attention

KERNEL_MAPS = ("dijiang", "dijiang_qmc", "performer")
DECAY_RANGE = (1 / 32, 1 / 512)


@dataclass(frozen=True)
class AttentionSpec:
    """What a :class:`LinearAttention` needs to know about the attention class it replaces.

    kept: names of the original's children reused under the same names (projections, dropout).
    project: (layer, hidden_states [B, T, D]) → q [B, H, T, d], k [B, Hkv, T, d], v [B, Hkv, T, d].
    output_modules: names of the original's children that map o [B, T, H·d] → [B, T, D] in turn: the output
        projection first, then dropout where the architecture has one (:meth:`output`).
    cache_kwarg: the keyword the decoder layer passes the cache under ("past_key_values", "layer_past").
    rotary: the architecture's ``apply_rotary_pos_emb(q, k, cos, sin)``, or None when it has no RoPE.
    """

    kept: tuple[str, ...]
    project: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    output_modules: tuple[str, ...]
    cache_kwarg: str
    rotary: Callable | None

    def output(self, layer: nn.Module, o: torch.Tensor) -> torch.Tensor:
        """o [B, T, H·d] → [B, T, D]: ``layer``'s children ``output_modules`` applied in turn."""
        for name in self.output_modules:
            o = getattr(layer, name)(o)
        return o

    def output_projection(self, layer: nn.Module) -> nn.Module:
        """``layer``'s output projection: the first of ``output_modules``."""
        return getattr(layer, self.output_modules[0])


class LinearAttention(nn.Module):
    """Causal linear attention on the pretrained projections of ``original`` (module docstring).

    New parts (:meth:`new_state_dict`): ``feature_map`` (and ``feature_map_k`` unless shared), ``decay_log_rate`` [H]
    (with decay), ``window_mix_log`` [H] (with a window), ``gate`` (Linear D → H·d) and ``group_norm`` (H groups) with
    the output gate. They take the device and dtype of the kept projections. ``original`` is kept (not as a child: its
    weights are the kept children) so that attention transfer can run the softmax attention it replaces.

    Called like the replaced module; returns (output [B, T, D], None).
    """

    original: nn.Module

    def __init__(
        self,
        original: nn.Module,
        spec: AttentionSpec,
        config: LinearizeConfig,
        *,
        layer_idx: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ShapeError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.spec, self.config, self.layer_idx = spec, config, layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        for name in spec.kept:
            self.add_module(name, getattr(original, name))
        self.__dict__["original"] = original  # plain attribute: registering it would list the kept weights twice
        reference = next(p for name in spec.kept for p in getattr(self, name).parameters())
        self.op = get_linear_attention_op(config.op)
        self.qk_scale = head_dim**-0.25 if config.feature_map in KERNEL_MAPS else 1.0
        seed = config.seed + layer_idx
        self.feature_map = self._build_map(seed)
        self.feature_map_k = None if config.share_feature_map else self._build_map(seed)
        self.decay_log_rate = None
        if config.decay:
            theta = initial_decay_log_rate(num_heads).to(device=reference.device, dtype=reference.dtype)
            self.decay_log_rate = nn.Parameter(theta)
        self.window_mix_log = None
        self.drop_window = False
        if config.window:
            self.window_mix_log = nn.Parameter(torch.full((num_heads,), math.log(config.window_mix)))
        scaling = getattr(original, "scaling", None)
        self.softmax_scale = float(scaling) if isinstance(scaling, (int, float)) else head_dim**-0.5
        self.gate: nn.Linear | None = None
        self.group_norm: nn.GroupNorm | None = None
        if config.output_gate:
            self.gate = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
            nn.init.xavier_uniform_(self.gate.weight, gain=2**-2.5, generator=torch.Generator().manual_seed(seed))
            self.group_norm = nn.GroupNorm(num_heads, num_heads * head_dim)
        for name, module in self.named_children():
            if name not in spec.kept:
                module.to(device=reference.device, dtype=reference.dtype)

    def _build_map(self, seed: int) -> FeatureMap:
        params = inspect.signature(FEATURE_MAPS[self.config.feature_map].__init__).parameters
        options = {"seed": seed} if "seed" in params else {}
        return build_feature_map(self.config.feature_map, self.head_dim, self.num_heads, self.config.m, **options)

    def log_decay(self) -> torch.Tensor | None:
        """log γ [H] = −exp(decay_log_rate), every entry < 0; None without decay."""
        return None if self.decay_log_rate is None else -self.decay_log_rate.exp()

    def window_mix(self) -> torch.Tensor:
        """g [H] = exp(window_mix_log), the weight of the linear part against the softmax window."""
        if self.window_mix_log is None:
            raise ConfigError("this LinearAttention has no softmax window (window=0), so no window mix")
        return self.window_mix_log.exp()

    def new_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers added by the conversion (names relative to this layer)."""
        return {name: t for name, t in self.state_dict().items() if name.split(".")[0] not in self.spec.kept}

    def new_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors added by the conversion (feature maps, decay, gate, norm)."""
        return [p for name, p in self.named_parameters() if name.split(".")[0] not in self.spec.kept]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        """hidden_states [B, T, D] → (output [B, T, D], None); other arguments as the replaced module's."""
        if args:
            kwargs = self._keywords(hidden_states, args, kwargs)
        b, t, _ = hidden_states.shape
        q, k, v = self.spec.project(self, hidden_states)
        rotary = self.spec.rotary
        if rotary is not None:
            if kwargs.get("position_embeddings") is None:
                name = type(self.original).__name__
                raise ConfigError(f"{name} uses RoPE: position_embeddings=(cos, sin) is required, got None")
            cos, sin = kwargs["position_embeddings"]
            q, k = rotary(q, k, cos, sin)
        valid = key_padding(kwargs.get("attention_mask"), t)
        o = self.attend(q, k, v, valid, kwargs.get(self.spec.cache_kwarg))
        o = o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, H·d]
        if self.gate is not None and self.group_norm is not None:
            normed = self.group_norm(o.reshape(b * t, -1)).view(b, t, -1)  # [B, T, H·d]
            o = normed * F.silu(self.gate(hidden_states))
        return self.spec.output(self, o), None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        valid: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """q [B, H, T, d], k, v [B, Hkv, T, d], valid [B, T] (False: padding) → o [B, H, T, d].

        With a transformers ``Cache``, starts from this layer's state in it and stores the state after T tokens.
        """
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, T, d]
        key_map = self.feature_map if self.feature_map_k is None else self.feature_map_k
        fq, lq = self.feature_map.features(q * self.qk_scale)  # [B, H, T, m], [B, H, T] | None
        fk, lk = key_map.features(k * self.qk_scale)
        if self.config.stabilizer == "per_token":
            lq = lk = None
        if valid is not None:
            fk = fk * valid[:, None, :, None].to(fk.dtype)
            lk = None if lk is None else lk.masked_fill(~valid[:, None, :], float("-inf"))
        c = self.config
        if c.window and not (self.drop_window and self.training and cache is None):
            return self._attend_window(q, k, v, (fq, fk, lq, lk), valid, cache)
        options: LinearAttentionOptions = {
            "log_decay": self.log_decay(),
            "normalize": c.normalize,
            "chunk_size": c.chunk_size,
            "key_log_scale": lk,
            "query_log_scale": lq,
        }
        if cache is None:
            return self.op(fq, fk, v, **options)[0]
        layer = state_layer(cache, self.layer_idx)
        options["initial_state"], options["output_final_state"] = layer.linear_state(), True
        op = linear_attention_recurrent if q.shape[2] == 1 else self.op
        o, state = op(fq, fk, v, **options)
        layer.advance(state, q.shape[2])
        return o

    def _attend_window(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mapped: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
        valid: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """The hybrid of ``window.py`` on q, k [B, H, T, d] (RoPE applied), v [B, H, T, d] and ``mapped``: fq, fk
        [B, H, T, m] and their log shifts lq, lk [B, H, T] (None per token)."""
        fq, fk, lq, lk = mapped
        c = self.config
        layer = None if cache is None else state_layer(cache, self.layer_idx)
        o, state = sliding_window_linear_attention(
            q,
            k,
            v,
            fq,
            fk,
            window=c.window,
            sinks=c.sink_tokens,
            scale=self.softmax_scale,
            mix=self.window_mix(),
            log_decay=self.log_decay(),
            valid=valid,
            initial_state=None if layer is None else layer.window_state(),
            linear_op=linear_attention_recurrent if layer is not None and q.shape[2] == 1 else self.op,
            chunk_size=c.chunk_size,
            key_log_scale=lk,
            query_log_scale=lq,
        )
        if layer is not None:
            layer.advance(state, q.shape[2])
        return o

    def _keywords(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> dict:
        """Positional arguments named by the replaced module's own signature, merged into ``kwargs``."""
        signature = inspect.signature(self.original.forward)
        merged = {}
        for name, value in signature.bind(hidden_states, *args, **kwargs).arguments.items():
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                merged.update(value)
            else:
                merged[name] = value
        return merged

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"feature_map={c.feature_map}, heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}, "
            f"op={c.op}, decay={c.decay}, normalize={c.normalize}, output_gate={c.output_gate}, window={c.window}, "
            f"sink_tokens={c.sink_tokens}"
        )


def initial_decay_log_rate(num_heads: int) -> torch.Tensor:
    """θ [H] with γ_h = exp(−exp(θ_h)) = 1 − r_h, r_h geometric from 1/32 (head 0) to 1/512 (last head)."""
    rate = torch.exp(torch.linspace(math.log(DECAY_RANGE[0]), math.log(DECAY_RANGE[1]), num_heads, dtype=torch.float64))
    return torch.log(-torch.log1p(-rate)).to(torch.get_default_dtype())


def key_padding(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """[B, T] bool, False where the new token is padding, read from the mask the decoder layer passes; or None.

    A 4-D mask [B, 1, T, kv] (bool: True = visible; float: 0 = visible) is read on its diagonal over the last T
    key columns (a token sees itself unless it is padding); a 2-D mask [B, kv] on its last T columns.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ConfigError(
            f"attention_mask of type {type(attention_mask).__name__} is not supported by LinearAttention; "
            "use attn_implementation 'sdpa' or 'eager'"
        )
    if attention_mask.dim() == 2:
        return attention_mask[:, -length:].bool()
    if attention_mask.dim() != 4:
        shape = tuple(attention_mask.shape)
        raise ShapeError(f"attention_mask must be 2-D [B, kv] or 4-D [B, 1, T, kv], got shape {shape}")
    rows = torch.arange(length, device=attention_mask.device)
    diagonal = attention_mask[:, 0, rows, attention_mask.shape[-1] - length + rows]  # [B, T]
    return diagonal if diagonal.dtype == torch.bool else diagonal == 0
