"""Tests for the rating app's store: durability, ownership, exactly-once ratings, concurrency, exports, readers."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffpref.app import validation
from diffpref.app.store import NotFoundError, RatingConflictError, RatingStore
from diffpref.cli import main
from diffpref.data import (
    DataError,
    LoadStats,
    iter_preferences,
    load_preferences,
    read_jsonl_ratings,
    read_pickapic,
    read_ratings_db,
)
from diffpref.data.pickapic_writer import PICKAPIC_V2_SCHEMA
from diffpref.experiments.make_data import PAIRS_SCHEMA
from diffpref.training.cache import data_identity


def png(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(image_or_png: Image.Image | bytes) -> np.ndarray:
    image = image_or_png if isinstance(image_or_png, Image.Image) else Image.open(io.BytesIO(image_or_png))
    return np.asarray(image.convert("RGB"))


@pytest.fixture
def store(tmp_path: Path):
    with RatingStore(tmp_path / "app.db") as s:
        yield s


def user_with_pair(store: RatingStore, user_id: str, prompt: str = "a red cube", shade: int = 0) -> tuple[str, str, str]:
    """A user with two images (red-ish, blue-ish) shown as one pair: (pair_id, image_0, image_1)."""
    store.ensure_user(user_id)
    image_0 = store.add_image(user_id, prompt, png((200, shade, 0)), "tiny-sd", 1)
    image_1 = store.add_image(user_id, prompt, png((0, shade, 200)), "tiny-sd", 2)
    return store.add_pair(user_id, prompt, image_0, image_1), image_0, image_1


# --------------------------------------------------------------------------- durability and schema
def test_settings_and_durability_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with RatingStore(path) as first:
        conn = first._conn()
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        pair, image_0, _ = user_with_pair(first, "alice")
        rating = first.rate("alice", pair, "right")
        first.like("alice", image_0, False)
    with pytest.raises(RuntimeError, match="closed"):
        first.count_ratings()
    with RatingStore(path) as second:
        assert second.count_ratings() == 1
        assert second.ratings_for("alice")[0]["rating_id"] == rating["rating_id"]
        assert second.ratings_for("alice")[0]["label"] == 0.0
        assert second.get_image("alice", image_0) == png((200, 0, 0))
        assert second.likes_for("alice")[0]["liked"] is False
        assert second.get_user("alice")["display_name"] == "alice"


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    RatingStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        RatingStore(path)


# --------------------------------------------------------------------------- ownership
def test_other_users_pairs_and_images_are_refused(store: RatingStore) -> None:
    pair, image_0, image_1 = user_with_pair(store, "alice")
    _, bob_image, _ = user_with_pair(store, "bob")
    with pytest.raises(PermissionError):
        store.get_image("bob", image_0)
    with pytest.raises(PermissionError):
        store.rate("bob", pair, "left")
    with pytest.raises(PermissionError):
        store.get_pair("bob", pair)
    with pytest.raises(PermissionError):
        store.like("bob", image_0, True)
    with pytest.raises(PermissionError):
        store.add_pair("bob", "mixed", bob_image, image_1)  # one of the images is alice's
    with pytest.raises(NotFoundError):
        store.rate("alice", "0" * 32, "left")
    with pytest.raises(NotFoundError):
        store.get_image("alice", "f" * 32)
    assert store.count_ratings() == 0 and store.likes_for("bob") == []
    assert len(store.pairs_for("bob")) == 1  # the refused pair was not created


# --------------------------------------------------------------------------- exactly once
def test_rating_is_idempotent_and_final(store: RatingStore) -> None:
    pair, image_0, image_1 = user_with_pair(store, "alice")
    other = store.add_pair("alice", "a red cube", image_1, image_0)
    assert [p["pair_id"] for p in store.pending_pairs("alice")] == [pair, other]
    first = store.rate("alice", pair, "left")
    again = store.rate("alice", pair, "left")
    assert first["created"] and not again["created"]
    assert {k: v for k, v in first.items() if k != "created"} == {k: v for k, v in again.items() if k != "created"}
    assert first["label"] == 1.0
    with pytest.raises(RatingConflictError, match="already rated 'left'"):
        store.rate("alice", pair, "right")
    assert store.count_ratings() == store.count_ratings("alice") == 1
    assert [p["pair_id"] for p in store.pending_pairs("alice")] == [other]
    assert [p["choice"] for p in store.pairs_for("alice")] == ["left", None]
    assert store.get_pair("alice", pair)["choice"] == "left"
    assert store.rate("alice", other, "skip")["label"] is None
    assert store.pending_pairs("alice") == []


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("user_id", ["", "a b", "x" * 65, "-lead", "semi;colon", "é", 7, None])
def test_bad_user_ids_are_rejected(store: RatingStore, user_id) -> None:
    with pytest.raises(ValueError, match="invalid user id"):
        store.ensure_user(user_id)


def test_input_validation(store: RatingStore, monkeypatch) -> None:
    pair, image_0, image_1 = user_with_pair(store, "alice")
    with pytest.raises(ValueError, match="display name is 81 characters long; the limit is 80"):
        store.ensure_user("bob", "b" * 81)
    with pytest.raises(ValueError, match="control character"):
        store.ensure_user("bob", "bo\x00b")
    assert store.ensure_user("bob", "  Bob B  ")["display_name"] == "Bob B"
    with pytest.raises(ValueError, match="prompt is 501 characters long; the limit is 500"):
        store.add_image("alice", "p" * 501, png((1, 2, 3)), "m", 0)
    with pytest.raises(ValueError, match="prompt is empty"):
        store.add_pair("alice", "   ", image_0, image_1)
    with pytest.raises(ValueError, match="not a PNG"):
        store.add_image("alice", "p", b"\xff\xd8\xff\xe0 a jpeg", "m", 0)
    with pytest.raises(ValueError, match="not a readable PNG"):
        store.add_image("alice", "p", png((1, 2, 3))[:20], "m", 0)
    monkeypatch.setattr(validation, "MAX_PNG_BYTES", 10)
    with pytest.raises(ValueError, match="the limit is 10"):
        store.add_image("alice", "p", png((1, 2, 3)), "m", 0)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="seed must be a 64-bit integer"):
        store.add_image("alice", "p", png((1, 2, 3)), "m", 2**63)
    with pytest.raises(NotFoundError, match="ensure_user"):
        store.add_image("carol", "p", png((1, 2, 3)), "m", 0)
    with pytest.raises(ValueError, match="two different images"):
        store.add_pair("alice", "p", image_0, image_0)
    with pytest.raises(ValueError, match="valid choices are left, right, tie, skip"):
        store.rate("alice", pair, "up")
    with pytest.raises(ValueError, match="malformed pair id"):
        store.rate("alice", "../../etc/passwd", "left")
    with pytest.raises(ValueError, match="liked must be True or False"):
        store.like("alice", image_0, 1)
    assert store.count_ratings() == 0


# --------------------------------------------------------------------------- concurrency
def test_concurrent_ratings_are_counted_exactly_once(tmp_path: Path) -> None:
    users, per_user = 20, 50
    path = tmp_path / "load.db"
    choices = ("left", "right", "tie", "skip")
    with RatingStore(path) as store, RatingStore(path) as other_process_like:
        work: dict[str, list[tuple[str, str]]] = {}
        for u in range(users):
            user = f"user{u}"
            store.ensure_user(user)
            images = [store.add_image(user, "p", png((u, k, 0)), "m", k) for k in range(2)]
            work[user] = [(store.add_pair(user, f"prompt {i % 7}", *images), choices[(u + i) % 4])
                          for i in range(per_user)]
        results: list[dict] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        # Two clients per user submit the same ratings at the same time (a double submit), the
        # second through another RatingStore on the same file, as a second server process would.
        start = threading.Barrier(2 * users)

        def client(target: RatingStore, user: str) -> None:
            try:
                start.wait()
                mine = [target.rate(user, pair, choice) for pair, choice in work[user]]
                with lock:
                    results.extend(mine)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(target, f"user{u}"))
                   for u in range(users) for target in (store, other_process_like)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[:3]
        assert store.count_ratings() == users * per_user == 1000
        assert all(store.count_ratings(f"user{u}") == per_user for u in range(users))
        assert sum(r["created"] for r in results) == 1000 and len(results) == 2000
        by_pair: dict[str, set[int]] = {}
        for r in results:
            by_pair.setdefault(r["pair_id"], set()).add(r["rating_id"])
        assert len(by_pair) == 1000 and all(len(ids) == 1 for ids in by_pair.values())
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*), COUNT(DISTINCT pair_id) FROM ratings").fetchone() == (1000, 1000)


# --------------------------------------------------------------------------- exports and readers
def rated_store(store: RatingStore) -> dict[str, list[tuple[str, str]]]:
    """alice rates left/right/tie/skip, bob left: {user: [(pair_id, choice)]}."""
    store.ensure_user("zed")  # a user without ratings still gets an index (stable across exports)
    rated: dict[str, list[tuple[str, str]]] = {"alice": [], "bob": []}
    for k, choice in enumerate(("left", "right", "tie", "skip")):
        pair, _, _ = user_with_pair(store, "alice", prompt=f"alice prompt {k % 2}", shade=10 * k)
        store.rate("alice", pair, choice)
        rated["alice"].append((pair, choice))
    pair, _, _ = user_with_pair(store, "bob", prompt="bob prompt", shade=99)
    store.rate("bob", pair, "left")
    rated["bob"].append((pair, "left"))
    user_with_pair(store, "bob", prompt="never rated", shade=77)  # pending: exported nowhere
    return rated


def test_export_pickapic_round_trip(store: RatingStore, tmp_path: Path) -> None:
    rated_store(store)
    out = tmp_path / "export" / "pairs.parquet"
    summary = store.export_pickapic(out)
    assert summary == {"path": str(out), "pairs": 4, "decided": 3, "ties": 1, "skips_excluded": 1, "users": 2}
    assert not out.with_name("pairs.parquet.tmp").exists()

    schema = pq.read_schema(out)
    # Exactly the Pick-a-Pic columns and types the synthetic world writes, then the app's extras.
    assert schema.names[: len(PICKAPIC_V2_SCHEMA)] == PICKAPIC_V2_SCHEMA.names == PAIRS_SCHEMA.names[: len(PICKAPIC_V2_SCHEMA)]
    for field in PICKAPIC_V2_SCHEMA:
        assert schema.field(field.name).type == field.type == PAIRS_SCHEMA.field(field.name).type
    assert schema.names[len(PICKAPIC_V2_SCHEMA):] == ["app_user_id", "pair_id"]

    rows = pq.read_table(out).to_pylist()
    assert [r["app_user_id"] for r in rows] == ["alice"] * 3 + ["bob"]
    assert [r["user_id"] for r in rows] == [1, 1, 1, 2]  # creation order: zed (no ratings) is user 0
    assert [r["label_0"] for r in rows] == [1.0, 0.0, 0.5, 1.0]
    assert [r["best_image_uid"] == "" for r in rows] == [False, False, True, False]
    assert rows[0]["best_image_uid"] == rows[0]["image_0_uid"] and rows[1]["best_image_uid"] == rows[1]["image_1_uid"]
    assert [r["num_example_per_prompt"] for r in rows] == [2, 1, 2, 1]
    for r in rows:
        assert r["has_label"] and r["are_different"] and r["model_0"] == "tiny-sd"
        assert r["jpg_0"] == store.get_image(r["app_user_id"], r["image_0_uid"])  # byte-equal, not re-encoded

    soft = read_pickapic(out, tie_policy="soft")
    assert [p.label for p in soft.pairs] == [1.0, 0.0, 0.5, 1.0]
    assert [p.user_id for p in soft.pairs] == ["1", "1", "1", "2"]
    for pair, r in zip(soft.pairs, rows):
        assert np.array_equal(pixels(pair.image_0), pixels(store.get_image(r["app_user_id"], r["image_0_uid"])))
        assert np.array_equal(pixels(pair.image_1), pixels(store.get_image(r["app_user_id"], r["image_1_uid"])))
    assert len(read_pickapic(out)) == 3  # ties dropped by default


def test_read_ratings_db_through_load_preferences(store: RatingStore, tmp_path: Path) -> None:
    rated = rated_store(store)
    db = store.path
    result = load_preferences(db)
    assert [p.label for p in result.pairs] == [1.0, 0.0, 1.0]
    assert [p.user_id for p in result.pairs] == ["alice", "alice", "bob"]
    assert result.ties == 1 and dict(result.skipped) == {"tie": 1}
    assert result.pairs[0].extras["pair_id"] == rated["alice"][0][0]
    assert result.pairs[0].source_row.endswith(":rating 1")
    # Same pixels as the stored PNGs; the preferred image is the one the user picked.
    first = store.get_pair("alice", rated["alice"][0][0])
    assert np.array_equal(pixels(result.pairs[0].preferred), pixels(store.get_image("alice", first["image_0"])))
    second = store.get_pair("alice", rated["alice"][1][0])
    assert np.array_equal(pixels(result.pairs[1].preferred), pixels(store.get_image("alice", second["image_1"])))

    soft = read_ratings_db(db, tie_policy="soft")
    assert [p.label for p in soft.pairs] == [1.0, 0.0, 0.5, 1.0] and soft.users == 2
    assert len(read_ratings_db(db, tie_policy="soft", limit=2)) == 2
    stats = LoadStats(source=str(db))
    assert len(list(iter_preferences(db, stats=stats, tie_policy="soft"))) == 4 and stats.rows == 4
    with pytest.raises(ValueError, match="tie_policy"):
        iter_preferences(db, tie_policy="maybe")

    # The training cache key follows new ratings (which land in the WAL), not reads.
    before = data_identity(db)
    load_preferences(db)
    assert data_identity(db) == before
    pair, _, _ = user_with_pair(store, "bob", prompt="one more", shade=5)
    store.rate("bob", pair, "right")
    assert data_identity(db) != before
    assert len(load_preferences(db)) == 4

    not_ours = tmp_path / "other.db"
    with sqlite3.connect(not_ours) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(DataError, match="not a diffpref ratings database"):
        load_preferences(not_ours)
    with pytest.raises(FileNotFoundError):
        load_preferences(tmp_path / "absent.db")


def test_rated_examples_are_decided_ratings_oldest_first(store: RatingStore) -> None:
    rated_store(store)
    examples = store.rated_examples("alice")
    assert [prompt for prompt, _, _ in examples] == ["alice prompt 0", "alice prompt 1"]
    (_, preferred_0, rejected_0), (_, preferred_1, rejected_1) = examples
    assert (preferred_0, rejected_0) == (png((200, 0, 0)), png((0, 0, 200)))  # left: image_0 preferred
    assert (preferred_1, rejected_1) == (png((0, 10, 200)), png((200, 10, 0)))  # right: image_1 preferred
    assert store.rated_examples("alice", limit=1) == examples[-1:]
    assert store.rated_examples("zed") == []


def test_likes_export_is_a_jsonl_ratings_manifest(store: RatingStore, tmp_path: Path) -> None:
    _, alice_0, alice_1 = user_with_pair(store, "alice")
    _, bob_0, _ = user_with_pair(store, "bob", prompt="a blue ball")
    store.like("alice", alice_0, True)
    store.like("alice", alice_1, True)
    store.like("alice", alice_1, False)  # changed their mind: the latest wins
    store.like("bob", bob_0, True)
    assert [(r["image_id"], r["liked"]) for r in store.likes_for("alice")] == [(alice_0, True), (alice_1, False)]
    summary = store.export_likes(tmp_path / "likes")
    assert (summary["ratings"], summary["liked"], summary["disliked"], summary["users"]) == (3, 2, 1, 2)
    result = read_jsonl_ratings(summary["path"])
    assert not result.skipped
    assert [(r.user_id, r.liked, r.prompt) for r in result.ratings] == [
        ("alice", True, "a red cube"), ("alice", False, "a red cube"), ("bob", True, "a blue ball")]
    for rating in result.ratings:
        owner = rating.user_id
        assert np.array_equal(pixels(rating.image), pixels(store.get_image(owner, rating.extras["image_id"])))


def test_cli_inspect_and_export(store: RatingStore, tmp_path: Path, capsys) -> None:
    rated_store(store)
    store.like("alice", store.pairs_for("alice")[0]["image_0"], True)
    assert main(["data", "inspect", str(store.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pairs": 3, "users": 2, "ties": 1, "skipped": {"tie": 1}}
    out, likes = tmp_path / "pairs.parquet", tmp_path / "likes"
    assert main(["data", "export", "--db", str(store.path), "--out", str(out), "--likes-out", str(likes)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"]["pairs"] == 4 and summary["likes"]["ratings"] == 1
    assert main(["data", "inspect", str(out), "--json", "--tie-policy", "soft"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 4
    assert len(read_jsonl_ratings(likes / "ratings.jsonl")) == 1
    assert main(["data", "export", "--db", str(tmp_path / "absent.db"), "--out", str(out)]) == 2
    assert not (tmp_path / "absent.db").exists()
