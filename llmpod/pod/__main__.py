"""``python3 -m llmpod.pod``."""

from __future__ import annotations

import sys

from llmpod.pod.cli import main

sys.exit(main())
