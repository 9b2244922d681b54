"""``python -m slimtune``: the command line of :mod:`slimtune.app.cli`."""

from __future__ import annotations

from slimtune.app.cli import main

raise SystemExit(main())
