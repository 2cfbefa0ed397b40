#!/usr/bin/env python3
"""Print the stack's key numbers as Prometheus computes them (its HTTP query API).

    python3 docker/metrics.py http://127.0.0.1:9099

Standard library only, so it runs with any host python3. Exit status 1 when Prometheus
cannot be reached.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request

QUERIES = [
    ("viewers connected (model's count)", 'sum(remote_mvc_viewers_connected{model="remote_mvc.model"})', "n"),
    (
        "viewers connected (ticker's count)",
        'sum(remote_mvc_viewers_connected{model="remote_mvc.ticker"})',
        "n",
    ),
    (
        "viewer replicas scraped",
        'count(up{job="viewer"} == 1 and on (instance) (time() - timestamp(up{job="viewer"}) < 30))',
        "n",
    ),
    ("model revision", 'max(remote_mvc_model_revision{model="remote_mvc.model"})', "n"),
    ("notifications observed", "sum(remote_mvc_notification_latency_seconds_count)", "n"),
    (
        "notification latency p50 (5m)",
        "histogram_quantile(0.50, sum by (le) (rate(remote_mvc_notification_latency_seconds_bucket[5m])))",
        "s",
    ),
    (
        "notification latency p99 (5m)",
        "histogram_quantile(0.99, sum by (le) (rate(remote_mvc_notification_latency_seconds_bucket[5m])))",
        "s",
    ),
    (
        "notification latency p50 (all time)",
        "histogram_quantile(0.50, sum by (le) (remote_mvc_notification_latency_seconds_bucket))",
        "s",
    ),
    (
        "notification latency p99 (all time)",
        "histogram_quantile(0.99, sum by (le) (remote_mvc_notification_latency_seconds_bucket))",
        "s",
    ),
    ("viewers dropped (total)", "sum(remote_mvc_viewers_dropped_total) or vector(0)", "n"),
    ("notifications failed (total)", "sum(remote_mvc_notifications_failed_total) or vector(0)", "n"),
]


def query(base: str, expr: str) -> float | None:
    url = f"{base.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {body}")
    result = body["data"]["result"]
    if not result:
        return None
    return float(result[0]["value"][1])


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "no data"
    if value != value:  # NaN: no samples in the window
        return "no data (NaN)"
    if unit == "s":
        return f"{value * 1000:.3f} ms"
    return f"{value:g}"


def main(argv: list[str]) -> int:
    base = argv[1] if len(argv) > 1 else "http://127.0.0.1:9099"
    try:
        rows = [(label, fmt(query(base, expr), unit)) for label, expr, unit in QUERIES]
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot query Prometheus at {base}: {exc}", file=sys.stderr)
        return 1
    width = max(len(label) for label, _ in rows)
    print(f"Prometheus: {base}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
