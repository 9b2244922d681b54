"""FSDP2 (``torch.distributed.fsdp.fully_shard``) through accelerate, on CPU processes (gloo) too.

``accelerate launch --use_fsdp --fsdp_version 2`` sets ``ACCELERATE_USE_FSDP=true`` and ``FSDP_VERSION=2`` for
the launched processes, but accelerate 1.15 turns them into FSDP only on accelerators: on CPU processes
(``ACCELERATE_USE_CPU=1``) its state stays ``MULTI_CPU`` and the model is silently wrapped in DDP.
:func:`make_accelerator` switches such a state to FSDP with the plugin accelerate builds from the ``FSDP_*``
variables, so ``accelerator.prepare`` shards the model (fully_shard on every decoder layer, the embeddings, the
final norm with the head, and the root).

Sharded parameters are DTensors that hold 1/P of each tensor per process. The rest of this module converts
between them and the full tensors that slimtune's files hold: :func:`gather` (every process calls it, the
collectives run in the same order everywhere), :func:`copy_full` and :func:`shard_optimizer_state` for a resume,
:func:`gather_weights` after training, so the caller's model holds its full weights and ``save_adapter`` writes
the same files as without FSDP. Without FSDP every function here passes plain tensors through unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from slimtune.errors import ConfigError


def make_accelerator() -> Accelerator:
    """The Accelerator of a training run: accelerate's, switched to FSDP2 when the launch asked for FSDP on CPU.

    Raises:
        ConfigError: FSDP version 1 was asked for (``accelerate launch --use_fsdp`` without ``--fsdp_version 2``):
            slimtune supports FSDP2 only.
    """
    accelerator = Accelerator()
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return accelerator
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"FSDP_VERSION={version} is not supported: slimtune trains under FSDP2 only; launch with "
            "`accelerate launch --use_fsdp --fsdp_version 2 ...` (or set fsdp_version: 2 in the accelerate config)"
        )
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:  # accelerate ignores FSDP on CPU processes
        plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables that the launcher set
        # every process holds the whole model already; accelerate's rank-0 loading fails on persistent buffers
        # (LoRA-SP's masks: "'Tensor' object has no attribute 'device_mesh'")
        plugin.cpu_ram_efficient_loading = False
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState().distributed_type = DistributedType.FSDP  # as accelerate sets it: AcceleratorState() copies it
    return accelerator


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the model is sharded with FSDP (every process then takes part in each forward)."""
    return accelerator.distributed_type == DistributedType.FSDP


def gather(obj: Any) -> Any:
    """``obj`` (a tensor, or dictionaries, lists and tuples of them) with every DTensor gathered into a full CPU
    tensor; plain tensors are detached and moved to the CPU. Under FSDP every process must call it."""
    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().cpu()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: gather(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather(item) for item in obj)
    return obj


def copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full tensor ``full`` into ``param``: into this process's shard when ``param`` is a DTensor."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Turn the full per-parameter state tensors that ``load_state_dict`` put in ``optimizer`` (AdamW's moments,
    shaped like their parameter) into shards like their DTensor parameter's; scalars (``step``) stay."""
    for param, state in optimizer.state.items():
        if not isinstance(param, DTensor):
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                state[key] = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def gather_weights(model: nn.Module) -> None:
    """Undo FSDP2 on ``model`` after training (every process must call it): full, plain weights, its own classes.

    FSDP2's ``unshard`` registers the full parameters in place of the DTensor shards; then each sharded module's
    forward hooks are removed and its class (``FSDP<Class>``, made by ``fully_shard``) set back to ``<Class>``. So
    the caller's model is as it would be without FSDP: ``save_adapter`` writes the same files, a forward runs on
    one process alone.
    """
    from torch.distributed.fsdp import FSDPModule

    sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in sharded:
        module.unshard()
    for module in sharded:
        state = module._get_fsdp_state()
        state._pre_forward_hook_handle.remove()
        state._post_forward_hook_handle.remove()
        module.__class__ = type(module).__bases__[1]  # fully_shard's class is (FSDPModule, <Class>)
