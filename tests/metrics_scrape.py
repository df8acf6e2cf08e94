"""Scraping the functions' metrics server, as Prometheus does, to compare before and after."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from shared import metrics

Series = dict[tuple[str, frozenset], float]


def scrape() -> Series:
    port = metrics.serve_metrics()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("push_") and not sample.name.endswith("_created")
    }


def changes(before: Series, after: Series, *names: str) -> dict[tuple[str, frozenset], float]:
    """The series of these metric names whose value changed, with the change."""
    return {
        key: after[key] - before.get(key, 0.0)
        for key in after
        if key[0] in names and after[key] != before.get(key, 0.0)
    }


def series(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())
