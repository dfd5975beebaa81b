"""``python3 -m llmpod.mock``."""

from __future__ import annotations

import sys

from llmpod.mock.cli import main

sys.exit(main())
