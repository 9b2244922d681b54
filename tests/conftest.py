"""Test set-up: make the helpers in tests/ importable (``from cases import ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
