#!/usr/bin/env python3
"""Run the mock vLLM server: ``python3 mock_vllm_server.py --port 8001 --model NAME``.

The same as ``python3 -m llmpod.mock``; see llmpod/mock/cli.py and README ("The mock vLLM server").
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from llmpod.mock.cli import main

    sys.exit(main())
