"""Read a Prometheus exposition the way a scraper does (prometheus_client's own parser)."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} for every sample in the text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, default: float | None = None, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        if default is not None:
            return default
        raise KeyError(f"no sample {name}{labels}")
    return samples[key]


def values_of(samples: dict, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of one name, by its labels (zero values left out)."""
    return {labels: v for (n, labels), v in samples.items() if n == name and v}
