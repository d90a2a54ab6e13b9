"""The two formulas every kind of score shares; 0/0 is 0 throughout, as the definitions say."""

from __future__ import annotations


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0
