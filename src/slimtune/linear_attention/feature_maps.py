"""Feature maps φ for linear attention: per-head nn.Modules mapping x [B, H, T, d] to φ(x) [B, H, T, m].

The attention then uses φ(q)·φ(k) in place of exp(q·k) (see ``ops.py``). Registry ``FEATURE_MAPS`` maps a name
to its class; :func:`build_feature_map` builds one by name. Every map takes ``(head_dim, num_heads, m=None)``
plus its own keyword options; m defaults to head_dim for all of them.

Arithmetic runs in float32 at least (float64 for float64 inputs); the output has the input's dtype.

Stabiliser of the exponential maps (``dijiang``, ``dijiang_qmc``, ``performer``): the exponent y is shifted by its
per-token maximum over features, detached, before exp, so every exp is ≤ 1 and nothing overflows at any input size;
φ(x) = c(x)·φ_exact(x) with c(x) = exp(−max_j y_j(x)). :meth:`FeatureMap.features` returns that shifted φ together
with the shift log(1/c) [B, H, T], so the attention can undo it:
- exact (``LinearizeConfig.stabilizer="exact"``, the default): the shifts go to the op as the keys' and queries' log
  scales, where one running maximum per sequence keeps the state bounded (``ops``); φ(q)·φ(k) is then the kernel
  estimate itself at any length;
- per token (``"per_token"``, ``forward``'s output used as it is): for a query c cancels when the attention is
  normalised (up to eps); for a key it does not: key s is reweighted by c(k_s), the same kind of per-key rescaling
  that the per-token softmax of the official DiJiang code and of Hedgehog applies. Fine-tuning can absorb it, but
  φ(q)·φ(k) is then not the unstabilised kernel estimate.
The softmax-over-features maps (``dijiang_official``, ``hedgehog``) are bounded by construction and have no shift.
"""

from __future__ import annotations

import abc
import inspect
import math

import numpy as np
import torch
from scipy.stats import norm, qmc
from torch import nn

from slimtune.config import check_int
from slimtune.errors import ConfigError, ShapeError


def dct_matrix(d: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix C [d, d] (float64): C[k, n] = s_k cos(π (2n + 1) k / (2d)).

    s_0 = √(1/d), s_k = √(2/d) for k > 0; C @ x equals ``scipy.fft.dct(x, norm="ortho")``; C Cᵀ = I.
    """
    k = torch.arange(d, dtype=torch.float64)[:, None]
    n = torch.arange(d, dtype=torch.float64)[None, :]
    scale = torch.full((d, 1), math.sqrt(2.0 / d), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / d)
    return scale * torch.cos(math.pi * (2 * n + 1) * k / (2 * d))


def qmc_normal(n: int, dims: int, kind: str, seed: int) -> torch.Tensor:
    """Quasi-Monte-Carlo standard-normal points t = Φ⁻¹(u): [dims, n] float64.

    u are the first n points of a scrambled, seeded ``kind`` ("sobol" or "halton") sequence in ``dims``
    dimensions, so each row is a one-dimensional low-discrepancy set; u is clipped into [1e-9, 1 − 1e-9].
    """
    if kind == "sobol":
        u = qmc.Sobol(dims, scramble=True, rng=seed).random_base2(max(0, math.ceil(math.log2(n))))[:n]
    elif kind == "halton":
        u = qmc.Halton(dims, scramble=True, rng=seed).random(n)
    else:
        raise ConfigError(f"qmc must be 'sobol' or 'halton', got {kind!r}")
    return torch.from_numpy(norm.ppf(np.clip(u, 1e-9, 1 - 1e-9)).T.copy())  # [n, dims] → [dims, n]


class FeatureMap(nn.Module):
    """Shared base: checks the sizes and the input x [B, H, T, d]; subclasses return φ(x) [B, H, T, m]."""

    def __init__(self, head_dim: int, num_heads: int, m: int | None = None) -> None:
        super().__init__()
        check_int("head_dim", head_dim)
        check_int("num_heads", num_heads)
        check_int("m", m, optional=True)
        m = head_dim if m is None else m
        self.head_dim, self.num_heads, self.m = head_dim, num_heads, m

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, d] checked and cast to float32 at least."""
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ShapeError(
                f"{type(self).__name__} expects x of shape [B, H={self.num_heads}, T, d={self.head_dim}], "
                f"got {tuple(x.shape)}"
            )
        return x.to(torch.promote_types(x.dtype, torch.float32))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(φ(x) [B, H, T, m] as ``forward`` returns it, its log shift [B, H, T] or None): the map's exact value is
        φ(x)·exp(shift). Maps without a stabiliser return None."""
        return self(x), None

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}, m={self.m}"


class ExponentialFeatureMap(FeatureMap, abc.ABC):
    """Base of the maps φ(x) = w ⊙ exp(y(x)): subclasses give the exponent y [B, H, T, m] (float32 at least) and the
    weights w (broadcast to [H, 1, m]); the per-token shift is taken out here (module docstring)."""

    @abc.abstractmethod
    def exponent(self, x: torch.Tensor) -> torch.Tensor:
        """y(x): x [B, H, T, d] → [B, H, T, m], float32 at least."""

    @abc.abstractmethod
    def feature_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """w in ``dtype``, broadcastable to [H, 1, m]."""

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.exponent(x)  # [B, H, T, m]
        shift = y.amax(dim=-1).detach()  # [B, H, T]
        return (self.feature_weights(y.dtype) * (y - shift[..., None]).exp()).to(x.dtype), shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[0]


class DiJiangFeatureMap(ExponentialFeatureMap):
    """The paper's weighted-DCT map: φ(x) = D_h ⊙ exp(y − max_j y_j), y = diag(t_h) C_m x (stabiliser detached).

    - C_m [m, d]: rows of the orthonormal DCT-II matrix taken cyclically, row i = C[i mod d] (m ≤ d: the first m
      rows; m > d: rows repeat, each with its own frequency t_i). Buffer ``dct_rows``.
    - t_h [m] per head: quasi-Monte-Carlo normal points Φ⁻¹(u), u from a scrambled seeded Sobol (default) or
      Halton sequence in H dimensions, one dimension per head. Buffer ``freqs`` [H, m].
    - D_h [m] per head: learnable ``weight`` [H, m], initialised to √(1/m), the square root of the equal QMC
      weights 1/m, so that φ(q)·φ(k) = (1/m) Σ_i exp(y_i(q)) exp(y_i(k)) at init (up to the stabiliser).
    Stabiliser: the module docstring (undone exactly by the attention, or per token).
    The DCT is applied as a [m, d] matmul (faster than an FFT at head sizes). x [B, H, T, d] → [B, H, T, m].
    """

    dct_rows: torch.Tensor
    freqs: torch.Tensor

    def __init__(
        self, head_dim: int, num_heads: int, m: int | None = None, *, qmc: str = "sobol", seed: int = 0
    ) -> None:
        super().__init__(head_dim, num_heads, m)
        rows = torch.arange(self.m) % head_dim
        self.register_buffer("dct_rows", dct_matrix(head_dim)[rows].to(torch.get_default_dtype()))
        self.register_buffer("freqs", qmc_normal(self.m, num_heads, qmc, seed).to(torch.get_default_dtype()))
        self.weight = nn.Parameter(torch.full((num_heads, self.m), 1.0 / math.sqrt(self.m)))

    def exponent(self, x: torch.Tensor) -> torch.Tensor:
        """y = diag(t_h) C_m x: x [B, H, T, d] → [B, H, T, m], float32 at least."""
        xf = self._input(x)
        proj = self.freqs.to(xf.dtype)[:, :, None] * self.dct_rows.to(xf.dtype)  # [H, m, d], diag(t_h) C_m
        return torch.einsum("bhtd,hmd->bhtm", xf, proj)

    def feature_weights(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)[:, None, :]  # [H, 1, m]


class DiJiangQmcFeatureMap(ExponentialFeatureMap):
    """A consistent DiJiang estimator: φ(x) = D_h ⊙ exp(W_h C x − |x|²/2 − c), so that φ(q)·φ(k) → exp(q·k).

    The paper's map (``dijiang``) scales one fixed DCT row per feature by a scalar frequency, which does not
    estimate exp(q·k) however many features it has. Here each feature has a whole d-dimensional Gaussian direction
    in the frequency domain:
    - C [d, d]: the orthonormal DCT-II matrix; W_h [m, d] per head, row i = Φ⁻¹(u_i) with u_i the i-th point of a
      scrambled Sobol (default) or Halton sequence in d dimensions, seeded ``seed + h``: quasi-Monte-Carlo samples
      of N(0, I_d). As C is orthogonal, (Cq)·(Ck) = q·k and |Cx| = |x|, so the positive random-feature identity
      E_w[exp(w·Cq − |q|²/2) exp(w·Ck − |k|²/2)] = exp(q·k) holds, and the average over the m points converges
      to it (faster than over i.i.d. points). Buffer ``proj`` [H, m, d] = W_h C.
    - D_h [m] per head: learnable ``weight`` [H, m], initialised to √(1/m) (the equal QMC weights 1/m).
    - c: the per-token maximum of the exponent, detached (the module docstring says what it does).
    x [B, H, T, d] → [B, H, T, m]. To approximate softmax(q·k/√d), scale q and k by d^(−1/4) first.
    """

    proj: torch.Tensor

    def __init__(
        self, head_dim: int, num_heads: int, m: int | None = None, *, qmc: str = "sobol", seed: int = 0
    ) -> None:
        super().__init__(head_dim, num_heads, m)
        dct = dct_matrix(head_dim)
        directions = [qmc_normal(self.m, head_dim, qmc, seed + h).T for h in range(num_heads)]  # H × [m, d]
        self.register_buffer("proj", torch.stack([w @ dct for w in directions]).to(torch.get_default_dtype()))
        self.weight = nn.Parameter(torch.full((num_heads, self.m), 1.0 / math.sqrt(self.m)))

    def exponent(self, x: torch.Tensor) -> torch.Tensor:
        """The exponent before the stabiliser, W_h C x − |x|²/2: x [B, H, T, d] → [B, H, T, m], float32 at least."""
        xf = self._input(x)
        return torch.einsum("bhtd,hmd->bhtm", xf, self.proj.to(xf.dtype)) - 0.5 * xf.square().sum(-1, keepdim=True)

    def feature_weights(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)[:, None, :]  # [H, 1, m]


class DiJiangOfficialFeatureMap(FeatureMap):
    """The official DiJiang code's map: φ(x) = softmax over features of x C_m diag(t), one map for all heads.

    - C_m [d, m]: columns of the orthonormal DCT-II matrix C taken cyclically, column j = C[:, j mod d]; x C is
      the inverse DCT of x (the official ``x @ (C @ diag(t))``, with C = ``dct(eye, axis=0, norm="ortho")``).
    - t [m] = Φ⁻¹(u), u i.i.d. uniform from a torch generator seeded with ``seed`` (not QMC); an infinite
      t (u = 0) is set to 0 as in the official code. Buffer ``proj`` = C_m diag(t) [d, m].
    No weights, no decay, no 1/√d scaling here. x [B, H, T, d] → [B, H, T, m], each row summing to 1.
    """

    proj: torch.Tensor

    def __init__(self, head_dim: int, num_heads: int, m: int | None = None, *, seed: int = 0) -> None:
        super().__init__(head_dim, num_heads, m)
        u = torch.rand(self.m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        t = torch.from_numpy(norm.ppf(u.numpy()))
        t = torch.where(t.isinf(), torch.zeros_like(t), t)
        cols = torch.arange(self.m) % head_dim
        self.register_buffer("proj", (dct_matrix(head_dim)[:, cols] * t).to(torch.get_default_dtype()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = self._input(x)
        return torch.softmax(xf @ self.proj.to(xf.dtype), dim=-1).to(x.dtype)  # [B, H, T, m]


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """FAVOR+ projection [m, d] (float64): blocks of d orthonormal rows (QR of a Gaussian matrix), stacked and
    cut to m rows, row i rescaled by the norm of an independent N(0, I_d) vector so its length is χ_d-distributed
    as for an i.i.d. Gaussian row."""
    blocks = []
    for _ in range(-(-m // d)):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        blocks.append(q.T)
    rows = torch.cat(blocks)[:m]  # [ceil(m/d)·d, d] → [m, d]
    return torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=-1, keepdim=True) * rows


class PerformerFeatureMap(ExponentialFeatureMap):
    """FAVOR+ positive orthogonal random features: φ(x) = exp(W_h x − |x|²/2 − c)/√m.

    c = max_j (W_h x − |x|²/2)_j, per token and detached. Without c, E[φ(q)·φ(k)] = exp(q·k); with it (module
    docstring) the |x|²/2 term cancels inside c, so keys lose their exp(−|k|²/2) factor. To approximate
    softmax(q·k/√d), scale q and k by d^(−1/4) before the map. W_h [m, d] per head from
    :func:`orthogonal_gaussian` (seeded, fixed; buffer ``proj`` [H, m, d]). x [B, H, T, d] → [B, H, T, m].
    """

    proj: torch.Tensor

    def __init__(self, head_dim: int, num_heads: int, m: int | None = None, *, seed: int = 0) -> None:
        super().__init__(head_dim, num_heads, m)
        gen = torch.Generator().manual_seed(seed)
        proj = torch.stack([orthogonal_gaussian(self.m, head_dim, gen) for _ in range(num_heads)])  # [H, m, d]
        self.register_buffer("proj", proj.to(torch.get_default_dtype()))

    def exponent(self, x: torch.Tensor) -> torch.Tensor:
        """y = W_h x − |x|²/2: x [B, H, T, d] → [B, H, T, m], float32 at least."""
        xf = self._input(x)
        return torch.einsum("bhtd,hmd->bhtm", xf, self.proj.to(xf.dtype)) - 0.5 * xf.square().sum(-1, keepdim=True)

    def feature_weights(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((1, 1, 1), 1 / math.sqrt(self.m), dtype=dtype, device=self.proj.device)


class HedgehogFeatureMap(FeatureMap):
    """Hedgehog / LoLCATs learned softmax-mimicking map: φ(x) = [softmax(x W_h), softmax(−x W_h)].

    W_h [d, m/2] per head, learnable ``weight`` [H, d, m/2], initialised to the (rectangular) identity
    ``eye(d, m/2)``. Each half is a softmax over its own m/2 features, as in LoLCATs' ``SoftmaxDim``
    (so each half sums to 1 and φ(x) sums to 2). m must be even. x [B, H, T, d] → [B, H, T, m].
    """

    def __init__(self, head_dim: int, num_heads: int, m: int | None = None) -> None:
        super().__init__(head_dim, num_heads, m)
        if self.m % 2:
            raise ConfigError(f"hedgehog needs an even feature size m, got m={self.m} (m defaults to head_dim)")
        eye = torch.eye(head_dim, self.m // 2)
        self.weight = nn.Parameter(eye.expand(num_heads, head_dim, self.m // 2).clone())  # [H, d, m/2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = self._input(x)
        y = torch.einsum("bhtd,hdf->bhtf", xf, self.weight.to(xf.dtype))  # [B, H, T, m/2]
        return torch.cat([torch.softmax(y, dim=-1), torch.softmax(-y, dim=-1)], dim=-1).to(x.dtype)  # [B, H, T, m]


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "dijiang": DiJiangFeatureMap,
    "dijiang_official": DiJiangOfficialFeatureMap,
    "dijiang_qmc": DiJiangQmcFeatureMap,
    "performer": PerformerFeatureMap,
    "hedgehog": HedgehogFeatureMap,
}


def build_feature_map(name: str, head_dim: int, num_heads: int, m: int | None = None, **kw) -> FeatureMap:
    """Build the feature map registered under ``name``; ``kw`` are that map's keyword options (e.g. ``seed``)."""
    if name not in FEATURE_MAPS:
        raise ConfigError(f"unknown feature map {name!r}; allowed: {sorted(FEATURE_MAPS)}")
    cls = FEATURE_MAPS[name]
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p, spec in params.items() if spec.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConfigError(f"feature map {name!r} got unknown option(s) {unknown}; allowed: {allowed}")
    return cls(head_dim, num_heads, m, **kw)
