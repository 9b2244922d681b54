"""LoRA-SP (arXiv 2403.08822): LoRA with a seeded random fraction of A's and B's entries frozen.

ΔW = s·B·A as in LoRA. A fraction ``freeze_fraction`` of the entries of A and, independently, of B is frozen,
drawn once from a seed and the module's name (so the same config gives the same subsets on every run).

Real savings: only the trainable entries are a parameter (``lora_A_values``, ``lora_B_values``, 1-D), so
gradients and optimizer state cover only them; an index buffer says where they go, and the frozen part of A is a
buffer. With AdamW that is (1 − p)·3 instead of 3 float tensors of LoRA's size for gradient + two moments.

Consequences of freezing (documented choice; the paper leaves them open):
- Frozen entries of A keep their random initial values (Kaiming, as LoRA).
- B starts at zero, so frozen entries of B stay zero forever: B is sparse. With ``granularity="element"`` every
  row and column of B still trains (with probability ≈ 1), so ΔW can reach rank min(r, d_in, d_out). With
  ``granularity="rank"`` whole rank components are frozen: rows of A and, independently, columns of B. A frozen
  B column is a zero column, so its component never contributes: the effective rank is at most r·(1 − p).
- r larger than min(d_in, d_out) is accepted as in LoRA (A and B keep the full r; one warning per injection).
- The subset is fixed. A re-drawn subset would need full-size gradients (a gradient mask saves nothing) and
  AdamW's moments would keep moving "frozen" entries, so slimtune does not offer it.

Saving writes the dense A and B (``lora_A``, ``lora_B``), like LoRA: a saved LoRA-SP adapter loads back into
slimtune (masks redrawn from the seed) and exports as a standard PEFT LoRA adapter (:mod:`slimtune.export`).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.adapters.base import Adapter
from slimtune.adapters.lora import LoraAdapter, LoraConfig
from slimtune.config import check_choice, check_int, check_number
from slimtune.errors import ShapeError

GRANULARITIES = ("element", "rank")


@dataclasses.dataclass
class LoraSpConfig(LoraConfig):
    """LoRA-SP: LoRA's fields plus

    Args:
        freeze_fraction: fraction p of the entries of A and of B that is frozen, in [0, 1).
        granularity: ``"element"`` (single entries) or ``"rank"`` (whole rows of A / columns of B).
        seed: draws the frozen subsets together with each module's name.
    """

    method: ClassVar[str] = "lora_sp"

    freeze_fraction: float = 0.5
    granularity: str = "element"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("freeze_fraction", self.freeze_fraction, at_least=0.0, below=1.0)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_int("seed", self.seed, minimum=0)

    @property
    def adapter_class(self) -> type[Adapter]:
        return LoraSpAdapter


def trainable_mask(shape: tuple[int, int], config: LoraSpConfig, axis: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of the trainable entries of a (rows, cols) factor.

    ``element``: exactly round((1 − p)·rows·cols) entries. ``rank``: exactly round((1 − p)·r) whole slices along
    ``axis`` (the rank axis: 0 for A's rows, 1 for B's columns).
    """
    keep = 1.0 - config.freeze_fraction
    if config.granularity == "element":
        numel = shape[0] * shape[1]
        chosen = torch.randperm(numel, generator=generator)[: round(keep * numel)]
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[chosen] = True
        return mask.view(shape)
    r = shape[axis]
    chosen = torch.randperm(r, generator=generator)[: round(keep * r)]
    along = torch.zeros(r, dtype=torch.bool)
    along[chosen] = True
    return (along.view(-1, 1) if axis == 0 else along.view(1, -1)).expand(shape).clone()


class LoraSpAdapter(LoraAdapter):
    """LoRA-SP on one layer.

    Parameters: ``lora_A_values`` (k_A,), ``lora_B_values`` (k_B,). Buffers: ``lora_A_frozen`` (r, d_in) the
    initial A, ``lora_A_index`` (k_A,) and ``lora_B_index`` (k_B,), the row-major positions of the trainable entries
    in A (r, d_in) and B (d_out, r), ascending, int32. The forward scatters the values to those positions (a scatter
    and its backward gather are several times faster than a boolean ``masked_scatter`` on CPU).
    """

    lora_A_frozen: torch.Tensor
    lora_A_index: torch.Tensor
    lora_B_index: torch.Tensor

    def __init__(self, config: LoraSpConfig, base_layer: nn.Module, module_name: str) -> None:
        super().__init__(config, base_layer, module_name)
        self.seed = config.seed
        self.module_name = module_name
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(module_name.encode()))
        device = self.lora_A.device
        mask_a = trainable_mask((config.r, self.d_in), config, axis=0, generator=generator).to(device)
        mask_b = trainable_mask((self.d_out, config.r), config, axis=1, generator=generator).to(device)
        initial_a, initial_b = self.lora_A.detach(), self.lora_B.detach()
        del self.lora_A, self.lora_B
        self.register_buffer("lora_A_frozen", initial_a.clone())
        self.register_buffer("lora_A_index", mask_a.flatten().nonzero().squeeze(1).to(torch.int32))
        self.register_buffer("lora_B_index", mask_b.flatten().nonzero().squeeze(1).to(torch.int32))
        self.lora_A_values = nn.Parameter(initial_a[mask_a].clone())  # row-major order, as the index
        self.lora_B_values = nn.Parameter(initial_b[mask_b].clone())

    @property
    def lora_A_mask(self) -> torch.Tensor:
        """Boolean (r, d_in), True where an entry of A trains."""
        return _mask(self.lora_A_index, self.lora_A_frozen.shape)

    @property
    def lora_B_mask(self) -> torch.Tensor:
        """Boolean (d_out, r), True where an entry of B trains."""
        return _mask(self.lora_B_index, (self.d_out, self.lora_A_frozen.shape[0]))

    def dense_a(self) -> torch.Tensor:
        """A (r, d_in): frozen initial values with the trainable ones scattered in (differentiable)."""
        frozen = self.lora_A_frozen.to(self.lora_A_values.dtype)
        return frozen.flatten().scatter(0, self.lora_A_index.long(), self.lora_A_values).view(frozen.shape)

    def dense_b(self) -> torch.Tensor:
        """B (d_out, r): zeros (frozen) with the trainable values scattered in (differentiable)."""
        values = self.lora_B_values
        zeros = torch.zeros(self.d_out * self.lora_A_frozen.shape[0], dtype=values.dtype, device=values.device)
        return zeros.scatter(0, self.lora_B_index.long(), values).view(self.d_out, -1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.dense_a()), self.dense_b()) * self.scaling

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.dense_b().to(weight.dtype) @ self.dense_a().to(weight.dtype)) * self.scaling

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.dense_a().detach(), "lora_B": self.dense_b().detach()}

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take dense A and B; B must be zero where this seed freezes it (else the file is not this LoRA-SP)."""
        a, b = tensors["lora_A"].to(self.lora_A_frozen), tensors["lora_B"].to(self.lora_B_values)
        if torch.any(b[~self.lora_B_mask] != 0):
            raise ShapeError(
                f"lora_B has non-zero entries where seed={self.seed} freezes B to zero in {self.module_name!r}: "
                "the file was not saved by a LoRA-SP adapter with this seed and freeze_fraction"
            )
        self.lora_A_frozen.copy_(a)
        self.lora_A_values.copy_(a[self.lora_A_mask])
        self.lora_B_values.copy_(b[self.lora_B_mask])


def _mask(index: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Boolean tensor of ``shape``, True at the row-major positions ``index`` (k,)."""
    mask = torch.zeros(math.prod(shape), dtype=torch.bool, device=index.device)
    mask[index.long()] = True
    return mask.view(*shape)
