#!/usr/bin/env python3
"""Create, watch and stop a vLLM pod on RunPod with a caching OpenAI proxy on localhost.

    python3 manage_pod.py [--local] [--verbose]     up: create or reuse the pod, start the proxy
    python3 manage_pod.py --status [--json]         what runs, what it costs, when it stops
    python3 manage_pod.py --shutdown [--all]        terminate and stop everything (the cache is kept)

See README ("Run on RunPod") and `python3 manage_pod.py --help`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from llmpod.pod.cli import main

    sys.exit(main())
