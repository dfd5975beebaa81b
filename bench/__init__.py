"""The proxy's benchmark: ``python3 bench/bench_proxy.py --help``."""
