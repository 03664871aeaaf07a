"""Command-line plumbing shared by every tool: one-line errors and checked flag types.

Bad input never ends in a traceback: code raises `UserError`, and `user_errors` turns it
into `error: <message>` on stderr and exit code 2 (the code argparse uses for bad flags).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A problem with what the user asked for (a path, a flag, a file), not a bug."""


def user_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a CLI `main(argv)` so a `UserError` exits with one line and status 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def _bounded(cast: Callable[[str], Any], low: float | None, high: float | None, what: str):
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        # NaN passes every comparison and inf every missing bound: no flag here takes either
        too_low, too_high = low is not None and value < low, high is not None and value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse shows this name in its messages
    return parse


positive_int = _bounded(int, 1, None, "an integer >= 1")
at_least_two = _bounded(int, 2, None, "an integer >= 2")
nonneg_int = _bounded(int, 0, None, "an integer >= 0")
positive_float = _bounded(float, 1e-300, None, "a finite number > 0")
nonneg_float = _bounded(float, 0.0, None, "a finite number >= 0")
unit_float = _bounded(float, 0.0, 1.0, "a number in [0, 1]")
digit = _bounded(int, 0, 9, "a digit 0-9")
finite_float = _bounded(float, None, None, "a finite number")


def digit_list(text: str) -> list[int]:
    """Parse `--labels 0,1,2` into digits 0-9."""
    return [digit(part.strip()) for part in text.split(",") if part.strip()]


def nonneg_or_none(text: str) -> float | None:
    """A number >= 0, with 0 meaning none (e.g. --sigma-min 0: no early end)."""
    return nonneg_float(text) or None


def interval(text: str) -> tuple[float, float] | None:
    """`LO,HI` -> (LO, HI) with 0 <= LO < HI; `all` -> None (no restriction)."""
    if text.strip().lower() == "all":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers) or 'all', got {text!r}") from None
    if not (0 <= lo < hi) or math.isnan(hi):
        raise argparse.ArgumentTypeError(f"expected 0 <= LO < HI, got {text!r}")
    return lo, hi


def index_pair(text: str) -> tuple[int, int]:
    """`A,B` -> (A, B): two test-set indices >= 0 (the ends of an interpolation)."""
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two test-image indices A,B, got {text!r}") from None
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError(f"expected two test-image indices A,B >= 0, got {text!r}")
    return a, b


def int_tuple(text: str) -> tuple[int, ...]:
    """Parse `1,3,6` into (1, 3, 6); an empty string is the empty tuple."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def image_counts(text: str) -> tuple[int, ...]:
    """`60000,120000` -> (60000, 120000): positive, increasing image counts."""
    counts = int_tuple(text)
    if any(c < 1 for c in counts) or list(counts) != sorted(set(counts)):
        raise argparse.ArgumentTypeError(f"expected increasing positive image counts, got {text!r}")
    return counts


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults in --help and keep the description's line breaks."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (`prog: error: ...`, exit code 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)
