"""Tests for the preference data layer: image validation, Pick-a-Pic parquet, JSONL manifests, inspect."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffpref.data import (
    SKIP_REASONS,
    DataError,
    ImageRating,
    ImageRejected,
    LoadStats,
    PreferencePair,
    decode_image,
    inspect_preferences,
    iter_pickapic,
    load_preferences,
    pairs_to_ratings,
    read_jsonl_manifest,
    read_jsonl_ratings,
    read_pickapic,
)

# --------------------------------------------------------------------------- helpers

# The published Pick-a-Pic v2 schema, extra columns included: the reader must ignore what it does not use.
PICKAPIC_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
    ]
)


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def row_colour(row: int, side: int) -> tuple[int, int, int]:
    """A colour that encodes the row index and which image of the pair it is."""
    return (row * 7 % 256, 40 + 160 * side, 90)


def row_image(row: int, side: int) -> bytes:
    return encode(Image.new("RGB", (8, 8), row_colour(row, side)))


def pickapic_row(row: int, **overrides: Any) -> dict[str, Any]:
    """One valid Pick-a-Pic row (image_0 preferred), with any column overridden."""
    values = {
        "are_different": True,
        "best_image_uid": f"uid-{row}-0",
        "caption": f"a red star number {row}",
        "created_at": datetime(2023, 5, 1, 12, 0, row % 60),
        "has_label": True,
        "image_0_uid": f"uid-{row}-0",
        "image_0_url": f"https://example.invalid/{row}_0.jpg",
        "image_1_uid": f"uid-{row}-1",
        "image_1_url": f"https://example.invalid/{row}_1.jpg",
        "jpg_0": row_image(row, 0),
        "jpg_1": row_image(row, 1),
        "label_0": 1.0,
        "label_1": 0.0,
        "model_0": "sdxl",
        "model_1": "sd-2.1",
        "ranking_id": 1000 + row,
        "user_id": 10 + row % 3,
        "num_example_per_prompt": 1,
        "__index_level_0__": row,
    }
    values.update(overrides)
    return values


def write_pickapic(path: Path, rows: list[dict[str, Any]], schema: pa.Schema = PICKAPIC_SCHEMA) -> Path:
    columns = {name: [r[name] for r in rows] for name in schema.names}
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def colour_of(image: Image.Image) -> tuple[int, ...]:
    return image.getpixel((0, 0))


def png_with_claimed_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is that of a 1x1 image.

    Decoding it fully would fail, so a "too_large" verdict proves the size was
    checked from the header before any pixel was decoded.
    """
    data = encode(Image.new("RGB", (1, 1), (1, 2, 3)))
    ihdr_at = data.index(b"IHDR")
    body = struct.pack(">II", width, height) + data[ihdr_at + 12 : ihdr_at + 17]
    chunk = b"IHDR" + body
    patched = chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    return data[:ihdr_at] + patched + data[ihdr_at + len(patched) :]


# --------------------------------------------------------------------------- records


def test_pair_preferred_rejected_and_label_validation() -> None:
    a, b = Image.new("RGB", (2, 2), "red"), Image.new("RGB", (2, 2), "blue")
    assert PreferencePair("p", a, b, 1.0).preferred is a
    assert PreferencePair("p", a, b, 0.0).preferred is b
    assert PreferencePair("p", a, b, 0.0).rejected is a
    tie = PreferencePair("p", a, b, 0.5)
    assert tie.is_tie and tie.preferred is a and tie.rejected is b
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(ValueError):
            PreferencePair("p", a, b, bad)


def test_pairs_to_ratings_one_like_one_dislike_per_decided_pair() -> None:
    a, b = Image.new("RGB", (2, 2), "red"), Image.new("RGB", (2, 2), "blue")
    pairs = [
        PreferencePair("p0", a, b, 0.0, user_id="u", source_row="f:0"),
        PreferencePair("p1", a, b, 0.5, user_id="u", source_row="f:1"),
        PreferencePair("p2", a, b, 0.8, user_id="v", source_row="f:2"),
    ]
    ratings = pairs_to_ratings(pairs)
    assert [(r.prompt, r.liked) for r in ratings] == [("p0", True), ("p0", False), ("p2", True), ("p2", False)]
    assert ratings[0].image is b and ratings[1].image is a
    assert ratings[2].image is a and ratings[3].user_id == "v"
    assert all(isinstance(r, ImageRating) for r in ratings)


# --------------------------------------------------------------------------- image validation


def assert_rgb(image: Image.Image, expected: tuple[int, int, int], tol: int = 3) -> None:
    assert image.mode == "RGB"
    arr = np.asarray(image)
    assert arr.dtype == np.uint8 and arr.shape[2] == 3
    assert all(abs(int(c) - e) <= tol for c, e in zip(colour_of(image), expected)), colour_of(image)


@pytest.mark.parametrize(
    ("make", "fmt", "expected"),
    [
        (lambda: Image.new("L", (4, 4), 100), "PNG", (100, 100, 100)),
        (lambda: Image.new("1", (4, 4), 1), "PNG", (255, 255, 255)),
        (lambda: Image.new("LA", (4, 4), (0, 0)), "PNG", (255, 255, 255)),  # transparent black -> white
        (lambda: Image.new("LA", (4, 4), (50, 255)), "PNG", (50, 50, 50)),
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG", (255, 127, 127)),  # half red on white
        (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 255)), "PNG", (10, 20, 30)),
        (lambda: Image.new("RGB", (4, 4), (0, 128, 0)).quantize(4), "PNG", (0, 128, 0)),
        (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
        (lambda: Image.new("I;16", (4, 4), 0x8000), "PNG", (128, 128, 128)),  # scaled, not clipped at 255
        (lambda: Image.new("I;16", (4, 4), 0xFFFF), "PNG", (255, 255, 255)),
        (lambda: Image.new("I", (4, 4), 65535 // 4), "TIFF", (64, 64, 64)),
        (lambda: Image.new("F", (4, 4), 0.5), "TIFF", (128, 128, 128)),
    ],
    ids=["L", "1", "LA-clear", "LA-opaque", "RGBA-half", "RGBA-opaque", "P", "CMYK", "I16-mid", "I16-max", "I32", "F"],
)
def test_decode_converts_modes_to_8bit_rgb(make, fmt: str, expected: tuple[int, int, int]) -> None:
    data = encode(make(), fmt)
    assert_rgb(decode_image(data), expected, tol=4 if fmt == "JPEG" else 1)


def test_decode_palette_with_transparency_composites_on_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    decoded = decode_image(encode(image, "PNG", transparency=0))
    assert colour_of(decoded) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (200, 0, 0)


def test_decode_reads_files_and_reports_missing(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    Image.new("RGB", (4, 4), (0, 0, 255)).save(path)
    assert_rgb(decode_image(path), (0, 0, 255), tol=4)
    assert_rgb(decode_image(str(path)), (0, 0, 255), tol=4)
    cases = [(None, "missing_image"), (b"", "missing_image"), (tmp_path / "nope.png", "missing_file")]
    noise = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    cases += [(b"definitely not an image", "undecodable_image"), (noise[: len(noise) // 2], "undecodable_image")]
    for data, reason in cases:
        with pytest.raises(ImageRejected) as err:
            decode_image(data)
        assert err.value.reason == reason


def test_decode_rejects_too_large_before_decoding() -> None:
    # Header says 5000x5000 (> default 4096*4096), pixel data is 1x1: only a header check says too_large.
    with pytest.raises(ImageRejected) as err:
        decode_image(png_with_claimed_size(5000, 5000))
    assert err.value.reason == "too_large" and "5000x5000" in str(err.value)
    # So large that PIL itself raises DecompressionBombError: still reported as too_large.
    with pytest.raises(ImageRejected) as err:
        decode_image(png_with_claimed_size(100_000, 100_000), max_pixels=None)
    assert err.value.reason == "too_large"
    # A real single-colour 5000x5000 PNG with max_pixels set lower.
    big = encode(Image.new("1", (5000, 5000), 1))
    with pytest.raises(ImageRejected) as err:
        decode_image(big, max_pixels=1000 * 1000)
    assert err.value.reason == "too_large"
    assert decode_image(row_image(0, 0), max_pixels=64).size == (8, 8)


# --------------------------------------------------------------------------- Pick-a-Pic parquet


def test_read_pickapic_rows_and_metadata(tmp_path: Path) -> None:
    path = write_pickapic(tmp_path / "train.parquet", [pickapic_row(0), pickapic_row(1, label_0=0.0, label_1=1.0)])
    result = read_pickapic(path)
    assert len(result.pairs) == 2 and result.ties == 0 and sum(result.skipped.values()) == 0
    first, second = result.pairs
    assert first.prompt == "a red star number 0" and first.label == 1.0 and first.user_id == "10"
    assert first.source_row == f"{path}:0" and second.source_row == f"{path}:1"
    assert first.extras["model_0"] == "sdxl" and first.extras["ranking_id"] == 1000
    assert "image_0_url" not in first.extras and "created_at" not in first.extras
    assert first.image_0.mode == "RGB" and colour_of(first.preferred) == row_colour(0, 0)
    assert second.label == 0.0 and colour_of(second.preferred) == row_colour(1, 1)
    assert result.source == str(path) and result.users == 2


def test_pickapic_minimal_columns_are_enough(tmp_path: Path) -> None:
    schema = pa.schema(
        [("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64())]
    )
    path = write_pickapic(tmp_path / "min.parquet", [pickapic_row(0), pickapic_row(1, label_0=0.0)], schema)
    result = read_pickapic(path)
    assert [p.label for p in result.pairs] == [1.0, 0.0]
    assert result.pairs[0].user_id == ""


def test_missing_required_columns_names_file_and_columns(tmp_path: Path) -> None:
    kept = [field for field in PICKAPIC_SCHEMA if field.name not in ("jpg_1", "label_0")]
    schema = pa.schema(kept)
    path = write_pickapic(tmp_path / "broken.parquet", [pickapic_row(0)], schema)
    with pytest.raises(ValueError) as err:
        read_pickapic(path)
    message = str(err.value)
    assert "broken.parquet" in message and "jpg_1" in message and "label_0" in message
    assert "caption, jpg_0, jpg_1, label_0" in message  # says what is expected


def test_pair_alignment_survives_a_corrupt_image(tmp_path: Path) -> None:
    rows = [pickapic_row(i) for i in range(6)]
    rows[3]["jpg_1"] = b"\x89PNG corrupt"
    result = read_pickapic(write_pickapic(tmp_path / "a.parquet", rows))
    assert result.skipped == {"undecodable_image": 1}
    kept_rows = [int(p.source_row.rsplit(":", 1)[1]) for p in result.pairs]
    assert kept_rows == [0, 1, 2, 4, 5]
    for row, pair in zip(kept_rows, result.pairs):
        assert pair.prompt == f"a red star number {row}"
        assert colour_of(pair.image_0) == row_colour(row, 0)
        assert colour_of(pair.image_1) == row_colour(row, 1)


BAD_ROWS = [
    ("missing_image", {"jpg_0": None}),
    ("missing_image", {"jpg_1": b""}),
    ("undecodable_image", {"jpg_0": b"not an image at all"}),
    ("too_large", {"jpg_1": png_with_claimed_size(5000, 5000)}),
    ("label_nan", {"label_0": math.nan}),
    ("label_nan", {"label_0": None}),
    ("label_out_of_range", {"label_0": 1.5, "label_1": -0.5}),
    ("label_out_of_range", {"label_0": 1.0, "label_1": 1.0}),
    ("empty_caption", {"caption": "   "}),
    ("empty_caption", {"caption": None}),
    ("no_label", {"has_label": False}),
]


@pytest.mark.parametrize(("reason", "override"), BAD_ROWS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_ROWS)])
def test_bad_row_is_skipped_and_counted_or_raises_in_strict(tmp_path: Path, reason: str, override: dict) -> None:
    assert reason in SKIP_REASONS
    rows = [pickapic_row(0), pickapic_row(1, **override), pickapic_row(2)]
    path = write_pickapic(tmp_path / "bad.parquet", rows)
    result = read_pickapic(path)
    assert result.skipped == {reason: 1}
    assert [p.prompt for p in result.pairs] == ["a red star number 0", "a red star number 2"]
    with pytest.raises(DataError) as err:
        read_pickapic(path, strict=True)
    message = str(err.value)
    assert "bad.parquet" in message and "row 1" in message and reason in message and "strict=False" in message
    assert err.value.row == 1 and err.value.reason == reason


def test_strict_error_row_index_counts_across_batches(tmp_path: Path) -> None:
    rows = [pickapic_row(i) for i in range(70)]  # more than one 64-row batch
    rows[66]["caption"] = ""
    path = write_pickapic(tmp_path / "many.parquet", rows)
    with pytest.raises(DataError, match="row 66: empty_caption"):
        read_pickapic(path, strict=True)
    assert len(read_pickapic(path, limit=5).pairs) == 5


def test_tie_policies(tmp_path: Path) -> None:
    rows = [pickapic_row(0), pickapic_row(1, label_0=0.5, label_1=0.5), pickapic_row(2, label_0=0.5, label_1=0.5)]
    path = write_pickapic(tmp_path / "ties.parquet", rows)
    dropped = read_pickapic(path)  # drop is the default, as in Diffusion-DPO
    assert len(dropped.pairs) == 1 and dropped.ties == 2 and dropped.skipped == {"tie": 2}
    assert len(read_pickapic(path, strict=True).pairs) == 1  # a tie is a policy choice, not bad data
    soft = read_pickapic(path, tie_policy="soft")
    assert len(soft.pairs) == 3 and soft.ties == 2 and sum(soft.skipped.values()) == 0
    tie = soft.pairs[1]
    assert tie.label == 0.5 and tie.is_tie and colour_of(tie.preferred) == row_colour(1, 0)
    with pytest.raises(ValueError, match="drop, soft"):
        read_pickapic(path, tie_policy="keep")


def test_soft_labels_are_kept(tmp_path: Path) -> None:
    path = write_pickapic(tmp_path / "soft.parquet", [pickapic_row(0, label_0=0.3, label_1=0.7)])
    for policy in ("drop", "soft"):
        (pair,) = read_pickapic(path, tie_policy=policy).pairs
        assert pair.label == pytest.approx(0.3) and colour_of(pair.preferred) == row_colour(0, 1)


def test_directory_glob_and_streaming(tmp_path: Path) -> None:
    folder = tmp_path / "pickapic"
    folder.mkdir()
    write_pickapic(folder / "train-0.parquet", [pickapic_row(0), pickapic_row(1)])
    write_pickapic(folder / "train-1.parquet", [pickapic_row(2, jpg_0=None), pickapic_row(3)])
    for source in (folder, str(folder / "*.parquet"), [folder / "train-0.parquet", folder / "train-1.parquet"]):
        result = load_preferences(source)
        assert [p.prompt[-1] for p in result.pairs] == ["0", "1", "3"] and result.skipped == {"missing_image": 1}
    with pytest.raises(DataError, match="train-1.parquet: row 0"):
        read_pickapic(folder, strict=True)
    stats = LoadStats(source=str(folder))
    stream = iter_pickapic(folder, stats=stats)
    assert next(stream).prompt.endswith("0")  # lazily: nothing beyond the first pair needed yet
    assert len(list(stream)) == 2 and stats.skipped == {"missing_image": 1} and stats.rows == 4


def test_iterators_check_arguments_before_the_first_pair(tmp_path: Path) -> None:
    kept = [field for field in PICKAPIC_SCHEMA if field.name != "caption"]
    path = write_pickapic(tmp_path / "nocaption.parquet", [pickapic_row(0)], pa.schema(kept))
    with pytest.raises(DataError, match="caption"):
        iter_pickapic(path)  # no next() needed
    with pytest.raises(ValueError, match="tie_policy"):
        iter_pickapic(path, tie_policy="average")


def test_huggingface_image_struct_cells(tmp_path: Path) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = [("caption", pa.string()), ("jpg_0", image_type), ("jpg_1", image_type), ("label_0", pa.float64())]
    schema = pa.schema(columns)
    row = {"caption": "c", "label_0": 0.0}
    row |= {f"jpg_{side}": {"bytes": row_image(5, side), "path": None} for side in (0, 1)}
    (pair,) = read_pickapic(write_pickapic(tmp_path / "hf.parquet", [row], schema)).pairs
    assert colour_of(pair.image_0) == row_colour(5, 0) and colour_of(pair.preferred) == row_colour(5, 1)


def test_load_preferences_dispatch_errors(tmp_path: Path) -> None:
    csv = tmp_path / "prefs.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown preference data format"):
        load_preferences(csv)
    with pytest.raises(FileNotFoundError):
        load_preferences(tmp_path / "absent.parquet")
    with pytest.raises(FileNotFoundError):
        load_preferences(tmp_path)  # a directory without parquet files
    with pytest.raises(FileNotFoundError):
        load_preferences(tmp_path / "ratings.sqlite")  # routed to the ratings database reader


# --------------------------------------------------------------------------- JSONL manifests


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_jsonl_manifest_relative_absolute_and_missing_files(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        for side in (0, 1):
            (images / f"{i}_{side}.png").write_bytes(row_image(i, side))

    def pair(i: int) -> dict[str, Any]:
        return {"prompt": ["zero", "one", "two"][i], "image_0": f"imgs/{i}_0.png", "image_1": f"imgs/{i}_1.png"}

    manifest = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {**pair(0), "label": 1.0, "user_id": "alice", "seed": 7},
            {**pair(1), "image_1": "imgs/gone.png", "label": 0.0, "user_id": "bob"},
            "",
            {**pair(2), "image_0": str(images / "2_0.png"), "label": 0, "user_id": "bob"},  # absolute path
            {"prompt": "tie", "image_0": "imgs/0_0.png", "image_1": "imgs/0_1.png", "label": 0.5},
            "{not json",
        ],
    )
    result = load_preferences(manifest)
    assert [p.prompt for p in result.pairs] == ["zero", "two"]
    assert result.skipped == {"missing_file": 1, "tie": 1, "malformed_line": 1} and result.ties == 1
    zero, two = result.pairs
    assert zero.user_id == "alice" and zero.extras == {"seed": 7} and zero.source_row == f"{manifest}:1"
    assert colour_of(zero.image_0) == row_colour(0, 0) and colour_of(two.image_1) == row_colour(2, 1)
    assert colour_of(two.preferred) == row_colour(2, 1)
    with pytest.raises(DataError) as err:
        read_jsonl_manifest(manifest, strict=True)
    assert "prefs.jsonl" in str(err.value) and "line 2" in str(err.value) and "missing_file" in str(err.value)
    soft = read_jsonl_manifest(manifest, tie_policy="soft")
    assert [p.prompt for p in soft.pairs] == ["zero", "two", "tie"]


def test_jsonl_bad_labels_and_wrong_manifest_kind(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(row_image(0, 0))
    pair = {"prompt": "p", "image_0": "a.png", "image_1": "a.png"}
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [{**pair, "label": 2}, {**pair}, {**pair, "label": 1, "prompt": ""}, {**pair, "label": 1, "image_1": None}],
    )
    result = read_jsonl_manifest(manifest)
    assert result.pairs == []
    assert result.skipped == {"label_out_of_range": 1, "label_nan": 1, "empty_caption": 1, "missing_image": 1}
    ratings_file = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "image": "a.png", "liked": True}])
    with pytest.raises(DataError, match="read_jsonl_ratings"):
        read_jsonl_manifest(ratings_file)


def test_jsonl_ratings(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(row_image(0, 0))
    (tmp_path / "b.png").write_bytes(row_image(0, 1))
    path = write_jsonl(
        tmp_path / "ratings.jsonl",
        [
            {"prompt": "p", "image": "a.png", "liked": True, "user_id": "alice"},
            {"prompt": "p", "image": "b.png", "liked": False, "user_id": "alice"},
            {"prompt": "p", "image": "c.png", "liked": False},
            {"prompt": "p", "image": "a.png", "liked": "maybe"},
        ],
    )
    result = read_jsonl_ratings(path)
    assert [(r.liked, colour_of(r.image)) for r in result.ratings] == [
        (True, row_colour(0, 0)),
        (False, row_colour(0, 1)),
    ]
    assert result.ratings[0].user_id == "alice"
    assert result.skipped == {"missing_file": 1, "label_out_of_range": 1}
    with pytest.raises(DataError, match="line 3: missing_file"):
        read_jsonl_ratings(path, strict=True)
    pair_line = {"prompt": "p", "image_0": "a.png", "image_1": "b.png", "label": 1}
    pairs_file = write_jsonl(tmp_path / "p.jsonl", [pair_line])
    with pytest.raises(DataError, match="read_jsonl_manifest"):
        read_jsonl_ratings(pairs_file)


# --------------------------------------------------------------------------- inspect


def test_inspect_preferences_summary(tmp_path: Path) -> None:
    rows = [
        pickapic_row(0, user_id=1),
        pickapic_row(1, user_id=2),
        pickapic_row(2, user_id=1, label_0=0.5, label_1=0.5),
        pickapic_row(3, user_id=3, jpg_1=b"garbage"),
        pickapic_row(4, user_id=4, has_label=False),
        pickapic_row(5, user_id=5, label_0=0.5, label_1=0.5),
    ]
    path = write_pickapic(tmp_path / "inspect.parquet", rows)
    summary = inspect_preferences(path)
    assert summary == {
        "pairs": 2,
        "users": 2,
        "ties": 2,
        "skipped": {"no_label": 1, "tie": 2, "undecodable_image": 1},
    }
    json.dumps(summary)  # the CLI prints it with --json
    soft = inspect_preferences(path, tie_policy="soft")
    assert soft == {"pairs": 4, "users": 3, "ties": 2, "skipped": {"no_label": 1, "undecodable_image": 1}}
    with pytest.raises(DataError, match="row 3"):
        inspect_preferences(path, strict=True)
