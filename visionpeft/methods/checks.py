"""Field checks for method configs: each bad value fails when the config is built, with the valid range.

Configs come from YAML files, ``key=value`` overrides, adapter-file metadata and Python, so the checks run in the
dataclasses' ``__post_init__``: a bad rank fails before a model is touched or a run folder is made.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any


def fail(owner: object, name: str, expected: str, value: Any, numeric: bool = False) -> ValueError:
    """``LoraConfig.r must be an integer >= 1, got 0``."""
    # YAML 1.1 reads 1e-3 (no dot) as a string, so a quoted-looking number needs a word of explanation
    hint = " (a string: write numbers unquoted, with a dot in exponents, e.g. 1.0e-3)" \
        if numeric and isinstance(value, str) else ""
    return ValueError(f"{type(owner).__name__}.{name} must be {expected}, got {value!r}{hint}")


def integer(owner: object, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise fail(owner, name, f"an integer >= {minimum}", value, numeric=True)
    return int(value)


def number(owner: object, name: str, value: Any, expected: str, ok) -> float:
    """A finite real number for which ``ok(value)`` holds; ``expected`` describes the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not ok(value):
        raise fail(owner, name, f"a number {expected}", value, numeric=True)
    return value if type(value) in (int, float) else float(value)


def names(owner: object, name: str, value: Any, regex: bool, allow_none: bool = True) -> list[str] | None:
    """A list of non-empty strings (a single string is one item); ``regex``: each must compile."""
    if value is None and allow_none:
        return None
    items = [value] if isinstance(value, str) else value
    kind = "regexes or module-name suffixes" if regex else "class names"
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v for v in items):
        raise fail(owner, name, f"a list of {kind} (non-empty strings)", value)
    if regex:
        for v in items:
            pattern(owner, name, v)
    return list(items)


def pattern(owner: object, name: str, value: str) -> None:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"{type(owner).__name__}.{name}: {value!r} is not a valid regex ({e}); escape special "
                         "characters with a backslash, e.g. 'model\\.0\\.conv'") from None
