"""SURM's structured matrices as modules: one class per structure in the registry :data:`STRUCTURES`.

A :class:`Structure` is one structured matrix M (d_out, d_in) that owns its parameters and their initialisation
(ΔW = 0 at the start). ``forward(x) = x @ Mᵀ`` runs the fast form and ``dense(dtype)`` builds M, both times the
structure's ``scale``; the math is in :mod:`slimtune.functional.structured`. Tiled structures cut the layer into
b×b blocks (b = ``block_size``, default gcd(d_in, d_out)), each block its own structured matrix, so every
parameter has leading dims (p, q) = (d_out/b, d_in/b). A structure's parameter names are the keys of saved
adapter files (``operator.<name>``), so they never change.
"""

from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.adapters.base import Factory
from slimtune.errors import ShapeError
from slimtune.functional import structured as S

if TYPE_CHECKING:
    from slimtune.adapters.surm import SurmConfig

# LDR's per-token FFT form holds an (N, p, q, K, b) intermediate; from this many tokens on, forming ΔW once
# (p·q·K·b³ multiply-adds) and one matmul is faster (measured at d=2048, b=64: equal at N≈64, 5x at N=256).
LDR_DENSE_FROM_TOKENS = 64


class Structure(nn.Module, abc.ABC):
    """A structured matrix M (d_out, d_in) with its parameters, scaled by ``scale`` (``config.alpha``)."""

    def __init__(self, config: SurmConfig, d_in: int, d_out: int, module_name: str, factory: Factory) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.scale = config.alpha

    @abc.abstractmethod
    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Mᵀ without the scale, by the fast form: (..., d_in) → (..., d_out), in x's dtype."""

    @abc.abstractmethod
    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """M (d_out, d_in) without the scale, formed densely in ``dtype``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d_in) → x @ Mᵀ (..., d_out), scale included."""
        return self.multiply(x) * self.scale

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """M (d_out, d_in), scale included, in ``dtype``."""
        return self.matrix(dtype) * self.scale


class TiledStructure(Structure):
    """A structure tiled into b×b blocks; subclasses create their (p, q, ...) parameters in ``init_parameters``."""

    def __init__(self, config: SurmConfig, d_in: int, d_out: int, module_name: str, factory: Factory) -> None:
        super().__init__(config, d_in, d_out, module_name, factory)
        b = config.block_size or S.default_block_size(d_in, d_out)
        try:
            grid = S.check_block_size(b, d_in, d_out)
        except ShapeError as err:
            raise ShapeError(f"{module_name!r}: {err}") from None
        self.init_parameters(config, (*grid, b), factory, torch.Generator().manual_seed(0))

    @abc.abstractmethod
    def init_parameters(
        self, config: SurmConfig, shape: tuple[int, int, int], factory: Factory, generator: torch.Generator
    ) -> None:
        """Create the parameters for blocks ``shape`` = (p, q, b); random ones draw from ``generator``."""


class Circulant(TiledStructure):
    """Block (i, j) = Circ(c_b ⊙ c_a)[i, j]: ``c_a`` (p, q, b) ~ N(0, 1), ``c_b`` (p, q, b) zeros."""

    def init_parameters(
        self, config: SurmConfig, shape: tuple[int, int, int], factory: Factory, generator: torch.Generator
    ) -> None:
        self.c_a = nn.Parameter(torch.randn(shape, generator=generator).to(**factory))
        self.c_b = nn.Parameter(torch.zeros(shape, **factory))

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        return S.circulant_apply(x, self.c_b * self.c_a)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        return S.dense_delta_circulant((self.c_b * self.c_a).to(dtype))


class Toeplitz(TiledStructure):
    """Block (i, j) = T(t[i, j]), general: ``t`` (p, q, 2b − 1) zeros."""

    symmetric: ClassVar[bool] = False

    def init_parameters(
        self, config: SurmConfig, shape: tuple[int, int, int], factory: Factory, generator: torch.Generator
    ) -> None:
        p, q, b = shape
        self.t = nn.Parameter(torch.zeros(p, q, b if self.symmetric else 2 * b - 1, **factory))

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        return S.toeplitz_apply(x, self.t, symmetric=self.symmetric)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        return S.dense_delta_toeplitz(self.t.to(dtype), symmetric=self.symmetric)


class SymmetricToeplitz(Toeplitz):
    """Block (i, j) = T(t[i, j]) with T[r, s] = t[|r − s|]: ``t`` (p, q, b) zeros."""

    symmetric: ClassVar[bool] = True


class ToeplitzProduct(TiledStructure):
    """Block (i, j) = T(u[i, j])·T(w[i, j]), symmetric factors: ``u`` (p, q, b) zeros, ``w`` ~ N(0, 0.02)."""

    def init_parameters(
        self, config: SurmConfig, shape: tuple[int, int, int], factory: Factory, generator: torch.Generator
    ) -> None:
        self.u = nn.Parameter(torch.zeros(shape, **factory))
        self.w = nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(**factory))

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        return S.toeplitz_product_apply(x, self.u, self.w, symmetric=True)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        return S.dense_delta_toeplitz_product(self.u.to(dtype), self.w.to(dtype), symmetric=True)


class LowDisplacementRank(TiledStructure):
    """Block (i, j) = Σ_k Circ(c[i, j, k])·SkewCirc(h[i, j, k]), k < K = ``displacement_rank``.

    ``c`` (p, q, K, b) zeros, ``h`` (p, q, K, b) ~ N(0, 0.02). Applied per token by FFT for fewer than
    :data:`LDR_DENSE_FROM_TOKENS` tokens, through the formed M for more.
    """

    def init_parameters(
        self, config: SurmConfig, shape: tuple[int, int, int], factory: Factory, generator: torch.Generator
    ) -> None:
        p, q, b = shape
        k = config.displacement_rank
        self.c = nn.Parameter(torch.zeros(p, q, k, b, **factory))
        self.h = nn.Parameter((torch.randn(p, q, k, b, generator=generator) * 0.02).to(**factory))

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.d_in >= LDR_DENSE_FROM_TOKENS:
            return F.linear(x, S.dense_delta_ldr(self.c, self.h).to(x.dtype))
        return S.ldr_apply(x, self.c, self.h)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        return S.dense_delta_ldr(self.c.to(dtype), self.h.to(dtype))


class Kronecker(Structure):
    """M = kron(B, A) scaled by alpha / r (not tiled): ``kron_a`` A (r, d_in/r) Kaiming, ``kron_b`` B (d_out/r, r)
    zeros; d_in + d_out parameters. r must divide d_in and d_out."""

    def __init__(self, config: SurmConfig, d_in: int, d_out: int, module_name: str, factory: Factory) -> None:
        super().__init__(config, d_in, d_out, module_name, factory)
        self.scale = config.alpha / config.r
        for field, dim in (("d_in", d_in), ("d_out", d_out)):
            if dim % config.r:
                raise ShapeError(
                    f"r={config.r} does not divide {field}={dim} of {module_name!r}: kronecker needs r dividing "
                    f"d_in and d_out; allowed r here: {S.common_divisors(d_in, d_out)[-8:]}"
                )
        b_shape, a_shape = S.kronecker_factor_shapes(d_in, d_out, config.r)
        self.kron_a = nn.Parameter(torch.empty(a_shape, **factory))
        nn.init.kaiming_uniform_(self.kron_a, a=math.sqrt(5))
        self.kron_b = nn.Parameter(torch.zeros(b_shape, **factory))

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        return S.kronecker_apply(x, self.kron_b, self.kron_a)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        return S.dense_delta_kronecker(self.kron_b.to(dtype), self.kron_a.to(dtype))


STRUCTURES: dict[str, type[Structure]] = {
    "circulant": Circulant,
    "toeplitz": Toeplitz,
    "toeplitz_symmetric": SymmetricToeplitz,
    "toeplitz_product": ToeplitzProduct,
    "kronecker": Kronecker,
    "ldr": LowDisplacementRank,
}
