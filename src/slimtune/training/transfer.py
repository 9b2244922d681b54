"""Attention transfer on cached teacher tensors: the fast path of :func:`slimtune.training.recovery.attention_transfer`.

Each layer's transfer loss only compares that layer's linear attention with its softmax attention on the hidden
states of the original model, and the only trainable parameters sit after the frozen q/k/v projections. So the
teacher's side of a block is computed once, without gradients (:meth:`TeacherCache.layer_tensors`): the original
model runs with every :class:`LinearAttention` standing in for its softmax module, and each layer records

    q [H, T, d], k, v [Hkv, T, d]   its projections of the incoming hidden states, RoPE applied to q and k
    target [T, D]                   the softmax attention's output: after its output projection (``compare="output"``)
                                    or what enters it, [T, H·d] (``compare="attention"``)
    x [T, D]                        the incoming hidden states (only with ``output_gate``, whose gate reads them)
    valid [T] or None               the key mask the attention got (None: no mask)

A training step then runs, per layer, only the added parts on the cached q, k, v (:func:`cached_layer_losses`):
:meth:`LinearAttention.attend`, the output gate and, with ``compare="output"``, the frozen output projection; MLPs,
projections, embedding and LM head are out of the step and out of the graph. The loss compared is the one of the
hook-based path, bit for bit in definition: per layer, ``F.mse_loss(output, target)`` in float32, where with
``compare="output"`` output is the layer's return value [B, T, D] (after ``o_proj``, and dropout for GPT-2) and
target the original module's; with ``compare="attention"`` both are what enters the output projection [B, T, H·d]
(LoLCATs' attention outputs), which keeps the output projection out of the step.

Blocks are cached by their token ids the first time a step uses them, each in a forward of its own (batch 1),
so a block's tensors do not depend on which blocks share its batch and a resumed run trains on the same tensors.
Memory: per cached token, L layers × (H·d + 2·Hkv·d + D, + D with the output gate) numbers in the model's dtype:
for SmolLM2-135M in float32 (30 layers, H·d = D = 576, Hkv·d = 192) 180 KiB a token, 22.5 MiB a 128-token block.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from slimtune.config import check_number
from slimtune.errors import ConfigError
from slimtune.linear_attention.convert import linear_attention_layers
from slimtune.linear_attention.layer import LinearAttention, key_padding

COMPARED = ("output", "attention")


class LayerTensors(NamedTuple):
    """What one layer's loss needs, for one block (shapes in the module docstring) or a batch (with B in front)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    x: torch.Tensor | None
    valid: torch.Tensor | None
    target: torch.Tensor


class TeacherCache:
    """The teacher tensors of every block seen so far, per layer of ``model`` (module docstring).

    The teacher runs in the mode ``model`` is in: eval mode (as :func:`attention_transfer` sets) for exact targets.
    ``compare``: which softmax output is the target, "output" or "attention" (module docstring).

    Raises:
        ConfigError: ``compare`` not one of :data:`COMPARED`.
    """

    def __init__(self, model: nn.Module, compare: str = "output") -> None:
        check_compare(compare)
        self.model, self.compare = model, compare
        self.layers = [layer for _, layer in linear_attention_layers(model)]
        self._blocks: dict[bytes, list[LayerTensors]] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def nbytes(self) -> int:
        """Bytes of the cached tensors."""
        return sum(t.numel() * t.element_size() for entry in self._blocks.values() for t in _tensors(entry))

    def layer_tensors(self, batch: torch.Tensor) -> list[LayerTensors]:
        """Per layer, the teacher tensors of ``batch`` [B, T] token ids stacked [B, ...]; missing blocks are cached."""
        keys = [row.cpu().numpy().tobytes() for row in batch]
        for key, row in zip(keys, batch):
            if key not in self._blocks:
                self._blocks[key] = self._teacher_pass(row[None])
        entries = [self._blocks[key] for key in keys]
        return [_stack([entry[i] for entry in entries]) for i in range(len(self.layers))]

    @torch.no_grad()
    def _teacher_pass(self, ids: torch.Tensor) -> list[LayerTensors]:
        """One block [1, T] through the original model; the tensors of every layer, without the batch dimension."""
        recorded: dict[int, LayerTensors] = {}
        with _softmax_stand_ins(self.layers, recorded, self.compare):
            self.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return [_first(recorded[i]) for i in range(len(self.layers))]


def check_cache_size(
    model: nn.Module, blocks: torch.Tensor, visits: int, max_cache_gib: float, compare: str = "output"
) -> None:
    """Refuse a run whose cache could outgrow ``max_cache_gib``: ``visits`` block uses of ``blocks`` [n, T], with the
    targets ``compare`` names.

    Raises:
        ConfigError: ``max_cache_gib`` not positive, or min(n, visits) blocks of teacher tensors above it.
    """
    check_number("max_cache_gib", max_cache_gib, above=0)
    layers = [layer for _, layer in linear_attention_layers(model)]
    if blocks.dim() != 2 or not layers:
        return  # the loop and _added_parameters name what is wrong
    hidden = getattr(getattr(model, "config", None), "hidden_size", layers[0].num_heads * layers[0].head_dim)
    numbers = 0
    for layer in layers:
        target = hidden if compare == "output" else layer.num_heads * layer.head_dim
        gate_input = hidden if layer.gate is not None else 0
        numbers += (layer.num_heads + 2 * layer.num_kv_heads) * layer.head_dim + target + gate_input
    element = next(iter(layers[0].parameters())).element_size()
    block = numbers * blocks.shape[1] * element
    count = min(len(blocks), visits)
    if count * block > max_cache_gib * 2**30:
        raise ConfigError(
            f"max_cache_gib={max_cache_gib} is too small for this cached attention transfer: {count} blocks × "
            f"{block / 2**20:.1f} MiB of teacher tensors = {count * block / 2**30:.1f} GiB; pass fewer distinct "
            "blocks (the steps cycle over them), raise max_cache_gib, or pass cached=False"
        )


def check_compare(compare: str) -> None:
    """Raises ConfigError unless ``compare`` is one of :data:`COMPARED`."""
    if compare not in COMPARED:
        raise ConfigError(f"compare must be one of {list(COMPARED)}, got {compare!r}")


def cached_layer_losses(cache: TeacherCache, batch: torch.Tensor) -> list[torch.Tensor]:
    """MSE(linear output, softmax output) [] of every layer on ``batch`` [B, T] token ids, from ``cache``
    (compared where ``cache.compare`` says)."""
    return [
        F.mse_loss(
            _layer_output(layer, layer.attend(t.q, t.k, t.v, t.valid), t.x, cache.compare).float(), t.target.float()
        )
        for layer, t in zip(cache.layers, cache.layer_tensors(batch))
    ]


def cached_transfer_loss(cache: TeacherCache) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The training loop's ``loss_fn``: the summed :func:`cached_layer_losses` of a batch.

    The layers are called directly, not through the model the loop passes, so it refuses more than one process
    (DDP / FSDP would not see the forward).
    """

    def summed_mse(forward_model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(
                f"cached=True is not allowed with {dist.get_world_size()} processes: the cached attention transfer "
                "runs on one process; pass cached=False under accelerate launch"
            )
        return torch.stack(cached_layer_losses(cache, batch)).sum()

    return summed_mse


def _layer_output(layer: LinearAttention, o: torch.Tensor, x: torch.Tensor | None, compare: str) -> torch.Tensor:
    """``layer``'s forward after its attention o [B, H, T, d]: the output gate (reading x [B, T, D]), then with
    ``compare="output"`` the output projection. Returns [B, T, D], or [B, T, H·d] for "attention"."""
    b, _, t, _ = o.shape
    o = o.transpose(1, 2).reshape(b, t, layer.num_heads * layer.head_dim)  # [B, T, H·d]
    if layer.gate is not None and layer.group_norm is not None and x is not None:
        normed = layer.group_norm(o.reshape(b * t, -1)).view(b, t, -1)  # [B, T, H·d]
        o = normed * F.silu(layer.gate(x))
    return layer.spec.output(layer, o) if compare == "output" else o


@contextlib.contextmanager
def projection_inputs(layer: LinearAttention) -> Iterator[list[torch.Tensor]]:
    """Inside, every input [B, T, H·d] of ``layer``'s output projection (shared with its original) is appended to
    the yielded list, in call order."""
    seen: list[torch.Tensor] = []
    handle = layer.spec.output_projection(layer).register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def _softmax_stand_ins(
    layers: list[LinearAttention], recorded: dict[int, LayerTensors], compare: str
) -> Iterator[None]:
    """Inside, ``layers[i]`` runs its original softmax module and puts its tensors [1, ...] in ``recorded[i]``."""

    def stand_in(i: int, layer: LinearAttention) -> Callable[..., tuple[torch.Tensor, None]]:
        def forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
            named = _arguments(layer.original, args, kwargs)
            x = named["hidden_states"]  # [1, T, D]
            with projection_inputs(layer) as attention:
                output = layer.original.train(layer.training)(*args, **kwargs)[0]  # [1, T, D]
            q, k, v = layer.spec.project(layer, x)
            if layer.spec.rotary is not None:
                q, k = layer.spec.rotary(q, k, *named["position_embeddings"])
            valid = key_padding(named.get("attention_mask"), x.shape[1])
            target = output if compare == "output" else attention[0]  # [1, T, D] or [1, T, H·d]
            recorded[i] = LayerTensors(q, k, v, x if layer.gate is not None else None, valid, target)
            return output, None

        return forward

    for i, layer in enumerate(layers):
        layer.forward = stand_in(i, layer)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _arguments(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by the names ``module.forward`` gives them (its ``**kwargs`` merged in)."""
    signature = inspect.signature(module.forward)
    named: dict[str, Any] = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def _first(batch: LayerTensors) -> LayerTensors:
    """The tensors of the first (only) block of ``batch``, without the batch dimension."""
    x, valid = batch.x, batch.valid
    return LayerTensors(
        batch.q[0],
        batch.k[0],
        batch.v[0],
        None if x is None else x[0],
        None if valid is None else valid[0],
        batch.target[0],
    )


def _stack(entries: list[LayerTensors]) -> LayerTensors:
    """Per field, the blocks' tensors stacked into a batch [B, ...] (None stays None)."""

    def stack(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        present = [t for t in tensors if t is not None]
        return torch.stack(present) if present and len(present) == len(tensors) else None

    return LayerTensors(
        torch.stack([e.q for e in entries]),
        torch.stack([e.k for e in entries]),
        torch.stack([e.v for e in entries]),
        stack([e.x for e in entries]),
        stack([e.valid for e in entries]),
        torch.stack([e.target for e in entries]),
    )


def _tensors(entry: list[LayerTensors]) -> Iterator[torch.Tensor]:
    return (t for tensors in entry for t in tensors if t is not None)
