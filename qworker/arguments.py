"""Argument types for argparse that reject a bad number with a message naming the value and the range."""

from __future__ import annotations

import argparse
from typing import Any


def positive_int(text: str) -> int:
    value = _parse(int, text, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use an integer of 1 or more")
    return value


def non_negative_int(text: str) -> int:
    value = _parse(int, text, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use an integer of 0 or more")
    return value


def positive_float(text: str) -> float:
    value = _parse(float, text, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use a number above 0")
    return value


def non_negative_float(text: str) -> float:
    value = _parse(float, text, "a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use a number of 0 or more")
    return value


def _parse(kind: type, text: str, description: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: use {description}") from None
