"""The routing rules on their own (``routing.py``): what a requirement or a capability may be, the
error that names the field, the match, and the query-string form of resources."""
from __future__ import annotations

import math

import pytest

from morag_remote.routing import (MAX_LABELS, MAX_MINIMUMS, Capabilities, Requirements, RoutingError,
                                  matching_keys, parse_resources)


@pytest.mark.parametrize("data, field", [
    ("gpu", "requires"),
    ({"labels": ["a"], "extra": 1}, "requires.extra"),
    ({"labels": "cuda12"}, "requires.labels"),
    ({"labels": [1]}, "requires.labels"),
    ({"labels": ["x"] * (MAX_LABELS + 1)}, "requires.labels"),
    ({"labels": [""]}, "requires.labels"),
    ({"labels": ["x" * 65]}, "requires.labels"),
    ({"min": [1]}, "requires.min"),
    ({"min": {f"r{n}": 1 for n in range(MAX_MINIMUMS + 1)}}, "requires.min"),
    ({"min": {"": 1}}, "requires.min"),
    ({"min": {"gpu_memory_gb": "24"}}, "requires.min.gpu_memory_gb"),
    ({"min": {"gpu_memory_gb": True}}, "requires.min.gpu_memory_gb"),
    ({"min": {"gpu_memory_gb": math.inf}}, "requires.min.gpu_memory_gb"),
])
def test_a_bad_requirement_is_refused_naming_its_field(data, field):
    with pytest.raises(RoutingError) as caught:
        Requirements.parse(data)
    assert caught.value.field == field and caught.value.message


def test_no_requirement_is_none_and_equal_requirements_share_a_key():
    assert Requirements.parse(None) is None and Requirements.parse({"labels": [], "min": {}}) is None
    assert Requirements.of(None) is None
    a = Requirements.parse({"labels": ["b", "a", "a"], "min": {"y": 2, "x": 1}})
    b = Requirements.parse({"min": {"x": 1, "y": 2}, "labels": ["a", "b"]})
    assert a.key == b.key and a.to_dict() == {"labels": ["a", "b"], "min": {"x": 1, "y": 2}}
    assert Requirements.of(a.to_dict()) == a


def test_a_requirement_is_met_only_by_every_label_and_every_minimum():
    need = Requirements.parse({"labels": ["cuda12"], "min": {"gpu_memory_gb": 24}})
    assert not need.met_by(None)
    assert not need.met_by(Capabilities.parse(["cpu"], {"gpu_memory_gb": 48}))
    assert not need.met_by(Capabilities.parse(["cuda12"], {"gpu_memory_gb": 16}))
    assert not need.met_by(Capabilities.parse(["cuda12"], {}))
    assert need.met_by(Capabilities.parse(["cuda12", "x"], {"gpu_memory_gb": 24}))
    caps = Capabilities.parse(["cuda12"], {"gpu_memory_gb": 24})
    assert caps.to_dict() == {"labels": ["cuda12"], "resources": {"gpu_memory_gb": 24}}
    known = {need.key: need}
    assert matching_keys({need.key, "unknown"}, caps, known) == {need.key}
    assert matching_keys({need.key}, None, known) == set()


def test_resources_in_a_query_string_are_name_number_pairs():
    assert parse_resources("gpu_memory_gb:48, cpus:8,,ram:1.5") == {"cpus": 8, "gpu_memory_gb": 48, "ram": 1.5}
    assert isinstance(parse_resources("a:48")["a"], int) and isinstance(parse_resources("a:4e1")["a"], float)
    for bad in ("gpu", "gpu:lots"):
        with pytest.raises(RoutingError) as caught:
            parse_resources(bad)
        assert caught.value.field == "resources"
