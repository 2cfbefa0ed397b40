"""Fan-out benchmark: remote-mvc against naive Pyro5 (two-way, oneway) and Redis pub/sub.

Run ``python -m bench --quick`` (CI smoke) or ``python -m bench`` (full run); see
``docs/performance.md`` for what is measured and the latest results.
"""
