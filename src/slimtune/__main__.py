"""``python -m slimtune``: the command line of :mod:`slimtune.cli`."""

from __future__ import annotations

from slimtune.cli import main

raise SystemExit(main())
