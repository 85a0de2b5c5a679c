"""Benchmark suite comparing fleet with Ray Serve and a no-framework baseline.

Run ``python -m bench --help`` from the repository root.
"""

__all__: list[str] = []
