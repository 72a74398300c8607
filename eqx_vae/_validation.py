"""Checks of configuration values, with errors that name the field."""

import math
from collections.abc import Sequence
from typing import Any


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    return value


def int_tuple(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"`{name}` must be a sequence of positive ints, got {value!r}.")
    return tuple(positive_int(name, v) for v in value)


def sample_size(value: Any) -> int | tuple[int, int]:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        sizes = int_tuple("sample_size", value)
        if len(sizes) != 2:
            raise ValueError(f"`sample_size` must be an int or (height, width), got {value!r}.")
        return (sizes[0], sizes[1])
    return positive_int("sample_size", value)


def finite_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return float(value)


def positive_float(name: str, value: Any) -> float:
    out = finite_float(name, value)
    if out <= 0:
        raise ValueError(f"`{name}` must be positive, got {value!r}.")
    return out
