"""``python3 -m llmpod.proxy``."""

from __future__ import annotations

import sys

from llmpod.proxy.serve import main

sys.exit(main())
