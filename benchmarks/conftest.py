"""Keeps pytest out of the benchmarks: they are run with ``python -m benchmarks``, not collected.

``testpaths`` in ``pyproject.toml`` already leaves this folder out of ``python -m pytest``; this
file makes ``pytest benchmarks`` or ``pytest .`` collect nothing here either (no doctests, no
timings), while ``tests/test_rounding.py`` still imports :mod:`benchmarks.state_precision`.
"""

collect_ignore_glob = ["*.py"]
