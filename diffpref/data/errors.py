"""Skip reasons and the errors raised for bad preference data."""

from __future__ import annotations

# Every reason a row can be skipped for; these exact strings are the keys of the
# per-reason skip report (``LoadResult.skipped``, ``inspect_preferences()["skipped"]``).
SKIP_REASONS: tuple[str, ...] = (
    "missing_image",  # the image cell is null or empty
    "undecodable_image",  # the bytes are not an image PIL can decode
    "missing_file",  # a manifest points at an image file that does not exist
    "too_large",  # the image header claims more than max_pixels pixels
    "label_nan",  # the label is missing, null or NaN
    "label_out_of_range",  # the label is outside [0, 1] or label_0 + label_1 != 1
    "empty_caption",  # the prompt is null or only whitespace
    "no_label",  # Pick-a-Pic ``has_label`` is false
    "tie",  # a tie dropped by tie_policy="drop"
    "malformed_line",  # a JSONL line that is not a JSON object
)

# Reasons that are a choice of the caller, not a fault in the data: strict mode
# never raises for them, because a tie is a perfectly valid Pick-a-Pic row.
POLICY_REASONS: frozenset[str] = frozenset({"tie"})

STRICT_HINT = "Fix or remove the row, or pass strict=False to skip such rows and count them."


class DataError(ValueError):
    """A preference file or one of its rows cannot be used.

    ``source`` is the file, ``row`` the 0-based row (or line) index within it and
    ``reason`` one of SKIP_REASONS; any of them may be None when not known.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.row = row
        self.reason = reason


class ImageRejected(DataError):
    """An image failed validation in ``decode_image``; ``reason`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}", reason=reason)
        self.detail = detail


def row_error(source: str, row: int, reason: str, detail: str, unit: str = "row") -> DataError:
    """The strict-mode error for one bad row: names the file, the row, the reason and the fix."""
    message = f"{source}: {unit} {row}: {reason} ({detail}). {STRICT_HINT}"
    return DataError(message, source=source, row=row, reason=reason)
