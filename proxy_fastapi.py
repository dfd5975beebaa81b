#!/usr/bin/env python3
"""Run the llmpod caching proxy: an OpenAI-compatible endpoint in front of a vLLM server.

    RUNPOD_ENDPOINT=http://127.0.0.1:8001/v1 python3 proxy_fastapi.py [--host 127.0.0.1] [--port 8000]

The same as ``python3 -m llmpod.proxy``; see llmpod/proxy/serve.py and README ("Proxy settings").
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from llmpod.proxy.serve import main

    sys.exit(main())
