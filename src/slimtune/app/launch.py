"""What a command prints about how it was launched: the process count, device and mixed precision."""

from __future__ import annotations

import os
from typing import Any

from accelerate.utils import DistributedType

ONE_PROCESS_HINT = (
    "`accelerate launch --cpu` starts ONE process whatever --num_processes says; for N CPU processes run "
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m slimtune finetune ..."
)


def describe_processes(accelerator: Any) -> str:
    """One line: ``"2 processes on cpu (DDP), mixed precision no"``, with a hint when ``accelerate launch --cpu`` ran a
    single process (its simple launcher ignores ``--num_processes``; only ``--multi_gpu`` starts several)."""
    count = accelerator.num_processes
    line = f"{count} process{'es' if count > 1 else ''} on {accelerator.device.type}"
    if count > 1:
        line += f" ({'FSDP2' if accelerator.distributed_type == DistributedType.FSDP else 'DDP'})"
    line += f", mixed precision {accelerator.mixed_precision}"
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ  # set by every `accelerate launch`
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if count == 1 and launched and on_cpu:
        line += f" (note: {ONE_PROCESS_HINT})"
    return line
