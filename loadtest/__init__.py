"""Load tests and the latency-parity benchmark (``python -m loadtest.parity``); see docs/performance/."""
