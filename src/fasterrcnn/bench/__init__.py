"""Measurements of the training step that scripts run and tests call (``scripts/bench_memory.py``)."""
