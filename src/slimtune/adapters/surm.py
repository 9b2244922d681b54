"""SURM (arXiv 2406.17740): structured unrestricted-rank updates, as a LoRA replacement and as adapters.

Each structure is a class of :mod:`slimtune.adapters.structures` (registry ``STRUCTURES``); the math (FFT fast
forms and dense forms) is in :mod:`slimtune.functional.structured`. A layer d_in → d_out is tiled into b×b blocks
(``block_size`` dividing both; default gcd(d_in, d_out)), each block its own structured matrix. Structures, with
the initialisation that makes ΔW zero at the start:

- ``circulant``: α·Circ(c_B ⊙ c_A) per block, c_A ~ N(0, 1), c_B = 0: 2b parameters per block.
- ``toeplitz``: α·T(t), general (2b − 1 per block), t = 0.
- ``toeplitz_symmetric``: α·T(t) with T[r, s] = t[|r − s|] (b per block), t = 0.
- ``toeplitz_product``: α·T(u)·T(w), symmetric factors as in the official code, w ~ N(0, 0.02), u = 0.
- ``kronecker``: (α/r)·kron(B, A), A (r, d_in/r) Kaiming, B (d_out/r, r) zeros: d_in + d_out parameters
  (not tiled; r must divide d_in and d_out).
- ``ldr``: α·Σ_{k<K} Circ(c_k)·SkewCirc(h_k), K = ``displacement_rank``, c = 0, h ~ N(0, 0.02): 2bK per block.
  Applied per token by FFT (skew-circulant through η, ηᵇ = −1) for few tokens, through the formed ΔW for many.

:class:`SurmConfig` replaces LoRA's update (``y = base(x) + ΔW x``). :class:`SurmAdapterConfig` is the structured
adapter placed after a layer's output h: ``out = h + act(α·M h) + bias`` with M a d_out×d_out structured matrix;
``activation="identity"`` builds :class:`SurmAffineOutputAdapter`, which merges into the layer, any other
activation :class:`SurmNonlinearOutputAdapter`, which cannot.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from slimtune.adapters.base import (
    Adapter,
    AdditiveAdapter,
    OutputAdapter,
    compute_dtype,
    input_dropout,
    parameter_factory,
)
from slimtune.adapters.structures import STRUCTURES
from slimtune.config import ALL_LINEAR, AdapterConfig, check_bool, check_choice, check_int, check_number
from slimtune.errors import ConfigError, MergeError

ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclasses.dataclass
class SurmConfig(AdapterConfig):
    """SURM as a LoRA replacement: ΔW is a tiled structured matrix.

    Args:
        structure: one of ``circulant``, ``toeplitz``, ``toeplitz_symmetric``, ``toeplitz_product``,
            ``kronecker``, ``ldr``.
        block_size: b, dividing d_in and d_out of every adapted layer; None takes each layer's gcd.
        r: the Kronecker factor size (``kronecker`` only; must divide d_in and d_out).
        displacement_rank: K of ``ldr``.
        alpha: scale of the update (``kronecker`` uses alpha / r, as LoRA).
    """

    method: ClassVar[str] = "surm"

    structure: str = "circulant"
    block_size: int | None = None
    displacement_rank: int = 1
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("structure", self.structure, tuple(STRUCTURES))
        check_int("block_size", self.block_size, optional=True)
        check_int("displacement_rank", self.displacement_rank)
        check_number("alpha", self.alpha)

    @property
    def adapter_class(self) -> type[Adapter]:
        """The class of this config's adapters (its capabilities are class attributes)."""
        return SurmAdapter


@dataclasses.dataclass
class SurmAdapterConfig(SurmConfig):
    """SURM structured adapter after a layer: ``out = h + act(α·M h) + bias``, M (d_out, d_out) structured.

    Args:
        activation: ``identity`` (mergeable), ``relu``, ``gelu`` or ``silu``.
        bias: learn the adapter's bias (starts at zero).
        target_modules: the layers whose output is adapted (default: attention and MLP outputs of Llama-style
            models, ``o_proj`` and ``down_proj``).
    """

    method: ClassVar[str] = "surm_adapter"

    target_modules: list[str] | str = dataclasses.field(default_factory=lambda: ["o_proj", "down_proj"])
    activation: str = "identity"
    bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_bool("bias", self.bias)
        if self.target_modules == ALL_LINEAR:
            raise ConfigError(
                f"target_modules={ALL_LINEAR!r} is not allowed for surm_adapter: name the layers whose output is "
                "adapted, e.g. ['o_proj', 'down_proj']"
            )

    @property
    def adapter_class(self) -> type[Adapter]:
        """The affine (mergeable) adapter for ``activation="identity"``, the non-linear one otherwise."""
        return SurmAffineOutputAdapter if self.activation == "identity" else SurmNonlinearOutputAdapter


class SurmAdapter(AdditiveAdapter):
    """SURM LoRA-replacement on one layer: ``y = base(x) + M·dropout(x)``, M = ``operator`` (d_out, d_in)."""

    def __init__(self, config: SurmConfig, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(config, base_layer, module_name)
        structure = STRUCTURES[config.structure]
        self.operator = structure(config, self.d_in, self.d_out, module_name, parameter_factory(base_layer))
        self.dropout = input_dropout(config.dropout)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.operator(self.dropout(x))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.operator.dense(weight.dtype)


class SurmOutputAdapter(OutputAdapter):
    """Structured adapter on a layer's output h = base(x): ``out = h + act(M h) + bias``, M = ``operator``.

    Parameters: the structure's (``operator.*``, M of shape (d_out, d_out)) and ``bias`` (d_out,) zeros, unless
    the config has ``bias=False``. :class:`SurmAffineOutputAdapter` (identity activation) merges into the layer;
    :class:`SurmNonlinearOutputAdapter` does not.
    """

    def __init__(self, config: SurmAdapterConfig, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(config, base_layer, module_name)
        factory = parameter_factory(base_layer)
        structure = STRUCTURES[config.structure]
        self.operator = structure(config, self.d_out, self.d_out, module_name, factory)
        self.activation = ACTIVATIONS[config.activation]()
        self.bias = nn.Parameter(torch.zeros(self.d_out, **factory)) if config.bias else None

    def transform_output(self, h: torch.Tensor) -> torch.Tensor:
        """h + act(M h) + bias: (..., d_out) → (..., d_out)."""
        out = h + self.activation(self.operator(h.to(self.param_dtype))).to(h.dtype)
        return out if self.bias is None else out + self.bias.to(h.dtype)


class SurmNonlinearOutputAdapter(SurmOutputAdapter):
    """SURM adapter with a non-linear activation (``relu``, ``gelu``, ``silu``): not affine, so never merged."""

    supports_merge: ClassVar[bool] = False

    def _refuse_merge(self) -> MergeError:
        return MergeError(
            f"a surm_adapter with activation={type(self.activation).__name__} cannot be merged into the "
            "layer: only activation='identity' gives an affine map"
        )

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise self._refuse_merge()

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise self._refuse_merge()


class SurmAffineOutputAdapter(SurmOutputAdapter):
    """SURM adapter with the identity activation: the affine map out = (I + M) h + bias.

    It merges exactly into the layer: W' = (I + M) W, b' = (I + M) b + bias (a bias is added to a layer that had
    none); unmerging solves with (I + M) in :func:`~slimtune.adapters.base.compute_dtype` of the weight.
    """

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.operator.dense(weight.dtype) @ weight

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._solve(weight)

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None:
            return None if self.bias is None else self.bias.clone()  # (I + M)·0 + bias
        merged = bias + self.operator.dense(bias.dtype) @ bias
        return merged if self.bias is None else merged + self.bias.to(bias.dtype)

    def unmerged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None:
            return None
        shifted = bias if self.bias is None else bias - self.bias.to(bias.dtype)
        return self._solve(shifted.unsqueeze(1)).squeeze(1)

    def _solve(self, merged: torch.Tensor) -> torch.Tensor:
        """(I + M)⁻¹·merged: merged (d_out, n) → (d_out, n) in its dtype, solved in its compute dtype."""
        dtype = compute_dtype(merged.dtype)
        system = torch.eye(self.d_out, dtype=dtype, device=merged.device) + self.operator.dense(dtype)
        return torch.linalg.solve(system, merged.to(dtype)).to(merged.dtype)
