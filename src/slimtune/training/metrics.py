"""The per-step metrics log of a run: ``metrics.jsonl`` (and TensorBoard scalars when installed)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from slimtune.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """One JSON object per step, appended to ``<output_dir>/metrics.jsonl``; TensorBoard scalars when installed.

    Opening it keeps only the lines of steps up to ``start_step`` (those of the resumed checkpoint's past), so a
    run killed after its last checkpoint leaves no duplicate steps once resumed.
    """

    def __init__(self, output_dir: Path, start_step: int) -> None:
        self.path = output_dir / METRICS_FILE
        kept = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", math.inf) <= start_step:
                        kept.append(line + "\n")

        def write_kept(tmp: str) -> None:
            Path(tmp).write_text("".join(kept), encoding="utf-8")

        atomic_write(self.path, write_kept)
        self.handle = self.path.open("a", encoding="utf-8")
        self.tensorboard = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
