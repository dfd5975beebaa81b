"""Fault, abuse and leak tests, and the runner that prints their reliability table (``python3 -m tests.faults``)."""
