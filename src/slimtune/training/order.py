"""The data order of the training loop: global sample position → block index, the same after a resume."""

from __future__ import annotations

import torch

GOLDEN = 0x9E3779B1  # odd, so seed ↦ seed · GOLDEN mod 2³² is one-to-one


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of (``seed``, ``epoch``): (seed · GOLDEN + epoch) mod 2³².

    torch's CPU generator keeps only the low 32 bits of its seed, so both numbers must reach those bits: for one
    epoch, different seeds (mod 2³²) give different generator seeds. Seed 0 gives the epoch itself.
    """
    return (seed * GOLDEN + epoch) % 2**32


class BlockOrder:
    """Global sample position → block index: epoch e is a permutation drawn from (seed, e), or the identity."""

    def __init__(self, n_blocks: int, seed: int, shuffle: bool) -> None:
        self.n_blocks, self.seed, self.shuffle = n_blocks, seed, shuffle
        self._epochs: dict[int, torch.Tensor] = {}

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Block indices [count] of the global samples ``start … start + count − 1``."""
        return torch.stack(
            [self._permutation(p // self.n_blocks)[p % self.n_blocks] for p in range(start, start + count)]
        )

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            if len(self._epochs) > 1:  # a step straddles at most two epochs
                del self._epochs[min(self._epochs)]
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._epochs[epoch] = (
                torch.randperm(self.n_blocks, generator=generator) if self.shuffle else torch.arange(self.n_blocks)
            )
        return self._epochs[epoch]
