"""SURM (arXiv 2406.17740): structured unrestricted-rank updates, as a LoRA replacement and as adapters.

The math (FFT fast forms and dense references) is in :mod:`slimtune.functional.structured`. A layer d_in → d_out
is tiled into b×b blocks (``block_size`` dividing both; default gcd(d_in, d_out)), each block its own structured
matrix. Structures, with the initialisation that makes ΔW zero at the start:

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
it can be merged into the layer only when ``activation="identity"``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.adapters.base import Adapter, AdditiveAdapter, base_features, parameter_factory
from slimtune.config import ALL_LINEAR, AdapterConfig, check_bool, check_choice, check_int, check_number
from slimtune.errors import ConfigError, MergeError, ShapeError
from slimtune.functional import structured as S

STRUCTURES = ("circulant", "toeplitz", "toeplitz_symmetric", "toeplitz_product", "kronecker", "ldr")
# LDR's per-token FFT form holds an (N, p, q, K, b) intermediate; from this many tokens on, forming ΔW once
# (p·q·K·b³ multiply-adds) and one matmul is faster (measured at d=2048, b=64: equal at N≈64, 5x at N=256).
LDR_DENSE_FROM_TOKENS = 64
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
        check_choice("structure", self.structure, STRUCTURES)
        check_int("block_size", self.block_size, optional=True)
        check_int("displacement_rank", self.displacement_rank)
        check_number("alpha", self.alpha)

    def build_adapter(self, base_layer: nn.Module, module_name: str) -> Adapter:
        d_in, d_out = base_features(base_layer)
        operator = StructuredOperator(self, d_in, d_out, module_name, parameter_factory(base_layer))
        return SurmAdapter(operator, self.dropout)


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

    def build_adapter(self, base_layer: nn.Module, module_name: str) -> Adapter:
        _, d_out = base_features(base_layer)
        operator = StructuredOperator(self, d_out, d_out, module_name, parameter_factory(base_layer))
        return SurmOutputAdapter(self, operator, d_out, parameter_factory(base_layer))


class StructuredOperator(nn.Module):
    """One structured d_in → d_out matrix M with its parameters; ``forward(x) = x @ Mᵀ`` by FFT, ``dense()`` = M."""

    def __init__(self, config: SurmConfig, d_in: int, d_out: int, module_name: str, factory: dict) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.structure = config.structure
        self.scale = config.alpha / config.r if config.structure == "kronecker" else config.alpha
        if config.structure == "kronecker":
            for field, dim in (("d_in", d_in), ("d_out", d_out)):
                if dim % config.r:
                    raise ShapeError(
                        f"r={config.r} does not divide {field}={dim} of {module_name!r}: kronecker needs r dividing "
                        f"d_in and d_out; allowed r here: {S._common_divisors(d_in, d_out)[-8:]}"
                    )
            b_shape, a_shape = S.kronecker_factor_shapes(d_in, d_out, config.r)
            self.kron_a = nn.Parameter(torch.empty(a_shape, **factory))
            nn.init.kaiming_uniform_(self.kron_a, a=math.sqrt(5))
            self.kron_b = nn.Parameter(torch.zeros(b_shape, **factory))
            return
        b = config.block_size or S.default_block_size(d_in, d_out)
        try:
            p, q = S.check_block_size(b, d_in, d_out)
        except ShapeError as err:
            raise ShapeError(f"{module_name!r}: {err}") from None
        generator = torch.Generator().manual_seed(0)
        if config.structure == "circulant":
            self.c_a = nn.Parameter(torch.randn(p, q, b, generator=generator).to(**factory))
            self.c_b = nn.Parameter(torch.zeros(p, q, b, **factory))
        elif config.structure == "toeplitz":
            self.t = nn.Parameter(torch.zeros(p, q, 2 * b - 1, **factory))
        elif config.structure == "toeplitz_symmetric":
            self.t = nn.Parameter(torch.zeros(p, q, b, **factory))
        elif config.structure == "toeplitz_product":
            self.u = nn.Parameter(torch.zeros(p, q, b, **factory))
            self.w = nn.Parameter((torch.randn(p, q, b, generator=generator) * 0.02).to(**factory))
        else:
            k = config.displacement_rank
            self.c = nn.Parameter(torch.zeros(p, q, k, b, **factory))
            self.h = nn.Parameter((torch.randn(p, q, k, b, generator=generator) * 0.02).to(**factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_in) → x @ Mᵀ (..., d_out), scale included."""
        s = self.structure
        if s == "circulant":
            y = S.circulant_apply(x, self.c_b * self.c_a)
        elif s in ("toeplitz", "toeplitz_symmetric"):
            y = S.toeplitz_apply(x, self.t, symmetric=s == "toeplitz_symmetric")
        elif s == "toeplitz_product":
            y = S.toeplitz_product_apply(x, self.u, self.w, symmetric=True)
        elif s == "kronecker":
            y = S.kronecker_apply(x, self.kron_b, self.kron_a)
        elif x.numel() // self.d_in >= LDR_DENSE_FROM_TOKENS:
            y = F.linear(x, S.dense_delta_ldr(self.c, self.h).to(x.dtype))
        else:
            y = S.ldr_apply(x, self.c, self.h)
        return y * self.scale

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """M (d_out, d_in) from the dense references, scale included, in ``dtype``."""
        s = self.structure
        if s == "circulant":
            m = S.dense_delta_circulant((self.c_b * self.c_a).to(dtype))
        elif s in ("toeplitz", "toeplitz_symmetric"):
            m = S.dense_delta_toeplitz(self.t.to(dtype), symmetric=s == "toeplitz_symmetric")
        elif s == "toeplitz_product":
            m = S.dense_delta_toeplitz_product(self.u.to(dtype), self.w.to(dtype), symmetric=True)
        elif s == "kronecker":
            m = S.dense_delta_kronecker(self.kron_b.to(dtype), self.kron_a.to(dtype))
        else:
            m = S.dense_delta_ldr(self.c.to(dtype), self.h.to(dtype))
        return m * self.scale


class SurmAdapter(AdditiveAdapter):
    """SURM LoRA-replacement on one layer: ``y = base(x) + M·dropout(x)``, M = ``operator``."""

    def __init__(self, operator: StructuredOperator, dropout: float) -> None:
        super().__init__(operator.d_in, operator.d_out)
        self.operator = operator
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.operator(self.dropout(x))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.operator.dense(weight.dtype)


class SurmOutputAdapter(Adapter):
    """Structured adapter on a layer's output h = base(x): ``out = h + act(M h) + bias``, M (d_out, d_out).

    With the identity activation it is the affine map out = (I + M) h + bias, so it merges exactly into the
    layer: W' = (I + M) W, b' = (I + M) b + bias (a bias is added to a layer that had none); unmerging solves
    with (I + M) in float32. Other activations cannot be merged (:class:`MergeError`).
    """

    weight_dependent: ClassVar[bool] = True
    transforms_output: ClassVar[bool] = True

    def __init__(self, config: SurmAdapterConfig, operator: StructuredOperator, d_out: int, factory: dict) -> None:
        super().__init__(d_out, d_out)
        self.operator = operator
        self.activation = ACTIVATIONS[config.activation]()
        self.supports_merge = config.activation == "identity"
        self.bias = nn.Parameter(torch.zeros(d_out, **factory)) if config.bias else None

    def forward(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.transform_output(base_layer(x))

    def transform_output(self, h: torch.Tensor) -> torch.Tensor:
        """h + act(M h) + bias: (..., d_out) → (..., d_out)."""
        out = h + self.activation(self.operator(h.to(self.param_dtype))).to(h.dtype)
        return out if self.bias is None else out + self.bias.to(h.dtype)

    def _check_mergeable(self) -> None:
        if not self.supports_merge:
            raise MergeError(
                f"a surm_adapter with activation={type(self.activation).__name__} cannot be merged into the "
                "layer: only activation='identity' gives an affine map"
            )

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        self._check_mergeable()
        return self.operator.dense(weight.dtype) @ weight

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._solve(weight.float()).to(weight.dtype)

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        self._check_mergeable()
        if bias is None and self.bias is None:
            return None
        dtype = (bias if bias is not None else self.bias).dtype
        base = bias if bias is not None else torch.zeros(self.d_out, dtype=dtype, device=self.bias.device)
        merged = base + self.operator.dense(dtype) @ base
        return merged if self.bias is None else merged + self.bias.to(dtype)

    def unmerged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if bias is None:
            return None
        shifted = bias.float() - (0 if self.bias is None else self.bias.float())
        return self._solve(shifted.unsqueeze(1)).squeeze(1).to(bias.dtype)

    def _solve(self, merged: torch.Tensor) -> torch.Tensor:
        """(I + M)⁻¹·merged in float32: merged (d_out, n) → (d_out, n)."""
        system = torch.eye(self.d_out, dtype=torch.float32, device=merged.device) + self.operator.dense(torch.float32)
        return torch.linalg.solve(system, merged)

