"""Exact peak tensor memory on any device, CPUs included (which have no allocator peak counter)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryPeak(TorchDispatchMode):
    """Peak bytes of tensor storages created while the mode is on (activations, gradients, temporaries).

    Counts each storage once, from the op that returned it until Python frees it: what the code allocates,
    independent of the allocator and of other processes, so exact and repeatable. Tensors that existed before
    (parameters, optimizer state) are not counted; add them separately.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.live:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
