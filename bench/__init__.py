"""Benchmarks, each run as ``python -m bench.<name>`` and writing its JSON, with its machine, to ``bench/results``."""
