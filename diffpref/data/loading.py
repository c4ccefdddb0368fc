"""Pieces shared by every reader: result objects, label checks, skip accounting, progress."""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from diffpref.data.errors import POLICY_REASONS, SKIP_REASONS, row_error
from diffpref.data.records import ImageRating, PreferencePair

# "drop" follows Diffusion-DPO: a tie names no winner, so it is no usable pair.
# "soft" keeps ties (label 0.5) for objectives that can learn from them.
TIE_POLICIES: tuple[str, ...] = ("drop", "soft")

# Below this many rows a progress bar is more noise than help.
PROGRESS_MIN_ROWS = 1000


@dataclass
class LoadStats:
    """What a reader saw, filled in while it streams: skips per reason, ties, rows read."""

    source: str
    skipped: Counter[str] = field(default_factory=Counter)
    ties: int = 0
    rows: int = 0


@dataclass
class LoadResult:
    """Usable preference pairs from one source plus the report of what was left out.

    ``skipped`` counts dropped rows per reason (keys from SKIP_REASONS); ``ties``
    counts tie rows seen, whether the tie policy kept or dropped them.
    """

    pairs: list[PreferencePair]
    skipped: Counter[str]
    ties: int
    source: str

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def users(self) -> int:
        """How many distinct user ids the usable pairs come from."""
        return len({pair.user_id for pair in self.pairs})


@dataclass
class RatingsResult:
    """Usable single-image ratings from one source plus the per-reason skip report."""

    ratings: list[ImageRating]
    skipped: Counter[str]
    source: str

    def __len__(self) -> int:
        return len(self.ratings)


def check_tie_policy(tie_policy: str) -> None:
    """Reject an unknown tie policy before any data is read."""
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"unknown tie_policy {tie_policy!r}; valid policies are {', '.join(TIE_POLICIES)}")


def parse_label(label_0: Any, label_1: Any = None) -> tuple[float | None, str | None, str]:
    """(label, None, "") for a usable label, else (None, reason, detail).

    ``label_1`` is optional (None means absent); when given it must agree with
    ``label_0`` (they sum to 1), since a disagreement means the row is corrupt.
    """
    value = _as_float(label_0)
    if value is None or math.isnan(value):
        return None, "label_nan", f"label is {label_0!r}"
    if not 0.0 <= value <= 1.0:
        return None, "label_out_of_range", f"label {value} is outside [0, 1]"
    if label_1 is not None:
        other = _as_float(label_1)
        if other is None or math.isnan(other):
            return None, "label_nan", f"label_1 is {label_1!r}"
        if abs(value + other - 1.0) > 1e-6:
            return None, "label_out_of_range", f"label_0={value} and label_1={other} do not sum to 1"
    return value, None, ""


def _as_float(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing or not a number."""
    if value is None or isinstance(value, str) and not value.strip():
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class RowJudge:
    """Counts skipped rows per reason, or raises for them in strict mode."""

    def __init__(self, stats: LoadStats, strict: bool, source: str | None = None, unit: str = "row") -> None:
        self.stats = stats
        self.strict = strict
        # The file being read: one LoadStats may span many files, errors must name the right one.
        self.source = source if source is not None else stats.source
        self.unit = unit  # "row" for parquet, "line" for JSONL, as the user would look it up

    def skip(self, row: int, reason: str, detail: str) -> None:
        """Record that ``row`` is dropped for ``reason``; in strict mode raise DataError instead."""
        assert reason in SKIP_REASONS, reason
        if self.strict and reason not in POLICY_REASONS:
            raise row_error(self.source, row, reason, detail, unit=self.unit)
        self.stats.skipped[reason] += 1


def progress_bar(total: int | None, progress: bool | None, desc: str) -> tqdm:
    """A tqdm bar: forced on/off by ``progress``; by default only on a terminal and for many rows."""
    if progress is None:
        show = sys.stderr.isatty() and (total is None or total >= PROGRESS_MIN_ROWS)
    else:
        show = progress
    return tqdm(total=total, desc=desc, unit="row", disable=not show, leave=False)


def collect(pairs: Iterable[PreferencePair], stats: LoadStats) -> LoadResult:
    """Drain a pair iterator into a LoadResult carrying its stats."""
    collected = list(pairs)
    return LoadResult(pairs=collected, skipped=stats.skipped, ties=stats.ties, source=stats.source)
