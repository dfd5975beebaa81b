"""The fidelity tier: the mock vLLM server checked against vLLM's own answers (recorded in ``golden/``)."""
