"""Routing rules: which worker may take which job, and what happens when a worker vanishes.

- A job may carry ``requires: {labels: [...], min: {name: number}}``; a poll may carry
  ``capabilities: {labels: [...], resources: {name: number}}``. A job is claimable by a poll only
  when its labels are a subset of the poll's and every minimum is met by a resource of at least
  that value. A poll without capabilities takes only jobs without requirements (the seed's worker
  sends none, and takes what it always took).
- Requirements are stored normalized (labels sorted and unique, empty parts dropped, an empty
  requirement is none at all), so jobs that need the same thing share one :attr:`Requirements.key`:
  a store groups pending jobs by that key and tests each distinct set once per claim.
- ``on_lapse``: what a lapsed lease does to the job (``requeue``, ``fail`` or ``hold``).

Pure functions and values only: both backends and the service import this module.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

MAX_LABELS = 32
MAX_NAME_LENGTH = 64
MAX_MINIMUMS = 32

REQUEUE, FAIL, HOLD = "requeue", "fail", "hold"
ON_LAPSE = (REQUEUE, FAIL, HOLD)


class RoutingError(ValueError):
    """A requirement or capability that breaks the rules; ``field`` names where (for a 422)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RoutingError(where, "must be a finite number")
    return value


def _names(values: Any, where: str) -> list[str]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise RoutingError(where, "must be a list of strings")
    if len(values) > MAX_LABELS:
        raise RoutingError(where, f"at most {MAX_LABELS} labels")
    for v in values:
        if not v or len(v) > MAX_NAME_LENGTH:
            raise RoutingError(where, f"each label must have 1 to {MAX_NAME_LENGTH} characters")
    return sorted(set(values))


def _amounts(values: Any, where: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise RoutingError(where, "must be an object of names and numbers")
    if len(values) > MAX_MINIMUMS:
        raise RoutingError(where, f"at most {MAX_MINIMUMS} names")
    out = {}
    for name, value in values.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
            raise RoutingError(where, f"each name must have 1 to {MAX_NAME_LENGTH} characters")
        out[name] = _number(value, f"{where}.{name}")
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Requirements:
    """What a job needs of the worker that takes it (never empty: no requirement is None)."""

    labels: frozenset[str]
    minimums: tuple[tuple[str, float], ...]
    key: str

    @classmethod
    def parse(cls, data: Any, where: str = "requires") -> "Requirements | None":
        """The requirements a create gave (RoutingError naming the field); None when there are none."""
        if data is None:
            return None
        if not isinstance(data, Mapping):
            raise RoutingError(where, "must be an object with labels and min")
        unknown = sorted(set(data) - {"labels", "min"})
        if unknown:
            raise RoutingError(f"{where}.{unknown[0]}", "unknown field (requires takes labels and min)")
        labels = _names(data.get("labels", []), f"{where}.labels")
        minimums = _amounts(data.get("min", {}), f"{where}.min")
        if not labels and not minimums:
            return None
        return cls(frozenset(labels), tuple(minimums.items()), _key(labels, minimums))

    @classmethod
    def of(cls, stored: Mapping[str, Any] | None) -> "Requirements | None":
        """The requirements of a stored (normalized) record."""
        return cls.parse(stored) if stored else None

    def to_dict(self) -> dict[str, Any]:
        return {"labels": sorted(self.labels), "min": dict(self.minimums)}

    def met_by(self, capabilities: "Capabilities | None") -> bool:
        if capabilities is None:
            return False
        if not self.labels <= capabilities.labels:
            return False
        resources = capabilities.resources
        return all(name in resources and resources[name] >= need for name, need in self.minimums)


def _key(labels: list[str], minimums: Mapping[str, float]) -> str:
    return json.dumps({"labels": labels, "min": minimums}, separators=(",", ":"), sort_keys=True)


def requirement_key(stored: Mapping[str, Any] | None) -> str | None:
    """The grouping key of a stored (normalized) requirement; None for none."""
    if not stored:
        return None
    return _key(sorted(stored.get("labels") or []), dict(sorted((stored.get("min") or {}).items())))


@dataclass(frozen=True)
class Capabilities:
    """What a polling worker offers."""

    labels: frozenset[str] = frozenset()
    resources: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, labels: Any = None, resources: Any = None, where: str = "capabilities") -> "Capabilities":
        return cls(frozenset(_names(labels or [], f"{where}.labels")),
                   _amounts(resources or {}, f"{where}.resources"))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": sorted(self.labels), "resources": dict(self.resources)}


def parse_resources(text: str, where: str = "resources") -> dict[str, float]:
    """``gpu_memory_gb:48,cpus:8`` (the query-string form) as a mapping."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition(":")
        if not sep:
            raise RoutingError(where, f"{part!r} is not name:number")
        try:
            number = float(value)
        except ValueError:
            raise RoutingError(where, f"{part!r}: {value!r} is not a number") from None
        if number.is_integer() and "." not in value and "e" not in value.lower():
            number = int(number)
        out[name.strip()] = number
    return _amounts(out, where)


def matching_keys(keys: "set[str] | Mapping[str, Requirements]", capabilities: Capabilities | None,
                  known: Mapping[str, Requirements]) -> set[str]:
    """The requirement keys (of ``keys``) that ``capabilities`` meets, each tested once."""
    if capabilities is None:
        return set()
    return {k for k in keys if k in known and known[k].met_by(capabilities)}
