"""What JSON the service takes, wherever it comes from (a request body, an import line): strict
JSON (no NaN or Infinity, no number beyond a double), no deeper than a limit, and no NUL character
in any string, since PostgreSQL's text and jsonb cannot hold one and both backends must refuse the
same input."""
from __future__ import annotations

import json
import math
from typing import Any

from .exceptions import InvalidRequest

MAX_DOCUMENT_DEPTH = 64  # a request body or a job record; task_options alone: schemas.MAX_JSON_DEPTH


def loads(text: str | bytes) -> Any:
    """``json.loads`` without NaN, Infinity or numbers beyond a double (ValueError); a document
    nested past the interpreter's recursion limit raises RecursionError."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite)


def _reject_constant(name: str) -> Any:
    """NaN and Infinity are not JSON (RFC 8259), though Python's parser takes them."""
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    """A JSON number as a float; Python reads one beyond the double range (``1e999``) as infinity,
    which would be stored and then written back out as ``Infinity``, which is not JSON either."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of a double")
    return value


def depth(value: Any, limit: int) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar is 0), counted up to ``limit + 1``
    (enough to tell "too deep"), iteratively: no recursion limit to hit."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def refuse_nul(value: Any) -> None:
    """InvalidRequest (422, naming the field) for a NUL character in any string, key or value."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                field = path or "_schema"
                raise InvalidRequest(f"{field} contains a NUL byte", {field: ["contains a NUL byte (U+0000)"]})
        elif isinstance(item, dict):
            for key, child in item.items():
                if "\x00" in key:
                    field = path or "_schema"
                    raise InvalidRequest(f"a key of {field} contains a NUL byte",
                                         {field: ["a key contains a NUL byte (U+0000)"]})
                stack.append((f"{path}.{key}" if path else str(key), child))
        elif isinstance(item, list):
            stack.extend((f"{path}.{i}", child) for i, child in enumerate(item))
