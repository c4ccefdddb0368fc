"""The latent/prompt cache: exact encodings, SDXL conditioning (per-image sizes and crops), flips, keys, reuse,
resumable builds, rating caches. The 2-process build is in test_cache_distributed.py."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import diffpref.training.cache.builder as builder_module
import diffpref.training.cache.layout as layout_module
from diffpref.data import DataError
from diffpref.models.builders import tiny_sd15_pipeline, tiny_sdxl_pipeline
from diffpref.training import randomness
from diffpref.training.cache import (
    PreferenceCache,
    build_preference_cache,
    build_rating_cache,
)
from diffpref.training.conditioning import (
    added_cond_kwargs,
    encode_images,
    encode_prompts,
    pair_cond,
    resize_center_crop,
)

RES = 32  # native resolution of the tiny pipelines: UNet sample size 16 x VAE factor 2
# Cached latents and embeddings are stored in fp16.
FP16_TOL = {"atol": 2e-3, "rtol": 2e-3}


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline(seed=0)


def noise_image(seed: int, size: tuple[int, int] = (RES, RES)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# Prompts repeat (row % 3) so unique prompts are encoded once; row 2 is a tie.
LABELS = [1.0, 0.0, 0.5, 1.0, 0.0, 0.7]


def write_parquet(path: Path, labels: list[float] = LABELS) -> Path:
    """A tiny Pick-a-Pic file: the columns the reader uses, noise images, three users and prompts."""
    rows = range(len(labels))
    table = pa.table({
        "caption": [f"a red star number {r % 3}" for r in rows],
        "jpg_0": [png(noise_image(2 * r)) for r in rows],
        "jpg_1": [png(noise_image(2 * r + 1)) for r in rows],
        "label_0": [float(x) for x in labels],
        "label_1": [1.0 - x for x in labels],
        "user_id": [10 + r % 2 for r in rows],
    })
    pq.write_table(table, path)
    return path


def write_manifest(directory: Path, size: tuple[int, int] = (48, 40)) -> Path:
    """A JSONL pair manifest with non-square images beside it."""
    lines = []
    for r in range(4):
        for side in (0, 1):
            Image.fromarray(noise_image(100 + 2 * r + side, size)).save(directory / f"{r}_{side}.png")
        lines.append({"prompt": f"blue circle {r % 2}", "image_0": f"{r}_0.png", "image_1": f"{r}_1.png",
                      "label": float(r % 2), "user_id": f"u{r % 2}"})
    manifest = directory / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def direct_latents(vae, array: np.ndarray) -> torch.Tensor:
    pixels = torch.tensor(array).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean[0] * vae.config.scaling_factor


def test_sd15_cache_matches_direct_encoding(sd15, tmp_path: Path, monkeypatch) -> None:
    data = write_parquet(tmp_path / "pairs.parquet")
    monkeypatch.setattr(layout_module, "CHUNK_ROWS", 2)  # items are read across several chunks
    cache = build_preference_cache(sd15, data, tmp_path / "cache", batch_size=3, progress=False, num_workers=0)

    kept = [r for r, label in enumerate(LABELS) if label != 0.5]  # tie_policy="drop"
    assert len(cache) == len(kept) and cache.skipped == {"tie": 1}
    # Chunks of 2 source rows: rows 0-1, 2-3 (row 2 is a tie), 4-5; each stores its own prompts.
    assert cache.meta["chunks"] == {"rows": [2, 1, 2], "prompts": [2, 1, 2]}
    assert cache.resolution == RES and cache.users == ["10", "11"]
    assert cache.prompts == ["a red star number 0", "a red star number 1", "a red star number 2"]
    with torch.no_grad():
        expected_embeds = sd15.encode_prompt(cache.prompts, "cpu", 1, False)[0]
    for i, row in enumerate(kept):
        item = cache[i]
        assert set(item) == {"latents_0", "latents_1", "label", "user_index", "prompt_index", "prompt_embeds"}
        assert item["latents_0"].dtype == torch.float32 and item["latents_0"].shape == (4, 16, 16)
        torch.testing.assert_close(item["latents_0"], direct_latents(sd15.vae, noise_image(2 * row)), **FP16_TOL)
        torch.testing.assert_close(item["latents_1"], direct_latents(sd15.vae, noise_image(2 * row + 1)), **FP16_TOL)
        assert item["label"].item() == pytest.approx(LABELS[row])
        assert cache.users[item["user_index"]] == str(10 + row % 2)
        assert cache.prompts[item["prompt_index"]] == f"a red star number {row % 3}"
        torch.testing.assert_close(item["prompt_embeds"], expected_embeds[row % 3], **FP16_TOL)
    with torch.no_grad():
        empty = sd15.encode_prompt([""], "cpu", 1, False)[0]
    torch.testing.assert_close(cache.empty_prompt_cond["prompt_embeds"], empty)  # stored in float32

    # A DataLoader batch drives the UNet directly; SD1.5 needs no added conditioning.
    batch = next(iter(torch.utils.data.DataLoader(cache, batch_size=3)))
    assert added_cond_kwargs(sd15.unet, batch, RES, 3) is None
    with torch.no_grad():
        out = sd15.unet(batch["latents_0"], torch.tensor([10, 20, 30]), encoder_hidden_states=batch["prompt_embeds"])
    assert out.sample.shape == (3, 4, 16, 16)


# (width, height) of image_0 / image_1 per row: every image its own size, so its own time ids.
SDXL_SIZES = [((48, 40), (32, 32)), ((49, 40), (40, 64)), ((33, 80), (64, 48)), ((40, 40), (100, 37))]


def test_sdxl_cache_pooled_embeds_and_per_image_time_ids(sdxl, tmp_path: Path) -> None:
    lines = []
    for r, sizes in enumerate(SDXL_SIZES):
        for side, size in enumerate(sizes):
            Image.fromarray(noise_image(300 + 2 * r + side, size)).save(tmp_path / f"{r}_{side}.png")
        lines.append({"prompt": f"blue circle {r % 2}", "image_0": f"{r}_0.png", "image_1": f"{r}_1.png",
                      "label": float(r % 2), "user_id": f"u{r % 2}"})
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cache = build_preference_cache(sdxl, manifest, tmp_path / "cache", batch_size=3, progress=False, num_workers=0)
    assert len(cache) == 4 and cache.is_sdxl and cache.users == ["u0", "u1"]

    item = cache[1]
    assert set(item) >= {"prompt_embeds", "pooled_prompt_embeds", "time_ids_0", "time_ids_1"}
    with torch.no_grad():
        embeds, _, pooled, _ = sdxl.encode_prompt(cache.prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(encode_prompts(sdxl, cache.prompts)["prompt_embeds"], embeds)
    assert embeds.shape[-1] == 16 + 16  # both encoders' penultimate states, concatenated
    torch.testing.assert_close(item["prompt_embeds"], embeds[1], **FP16_TOL)
    torch.testing.assert_close(item["pooled_prompt_embeds"], pooled[1], **FP16_TOL)

    # Non-square 49x40: the shorter side to 32 (49 * 0.8 = 39.2 -> 39 wide), centre crop from left 3.
    image = Image.open(tmp_path / "1_0.png")
    torch.testing.assert_close(item["latents_0"], direct_latents(sdxl.vae, np.asarray(resize_center_crop(image, RES))),
                               **FP16_TOL)
    torch.testing.assert_close(item["latents_0"], encode_images(sdxl.vae, [image], RES)[0], **FP16_TOL)
    assert item["time_ids_0"].tolist() == [40, 49, 0, 3, RES, RES]  # (orig h, orig w, top, left, target)

    # Time ids per image, from sizes computed here independently of the cache's helpers.
    def expected_ids(width: int, height: int) -> list[float]:
        scale = RES / min(width, height)
        new_w, new_h = max(round(width * scale), RES), max(round(height * scale), RES)
        return [height, width, (new_h - RES) // 2, (new_w - RES) // 2, RES, RES]

    batch = next(iter(torch.utils.data.DataLoader(cache, batch_size=4)))
    batch["cond"] = {k: batch.pop(k) for k in ("prompt_embeds", "pooled_prompt_embeds")}
    cond2 = pair_cond(batch)  # what the pair objectives run: latents_0's rows, then latents_1's
    added = added_cond_kwargs(sdxl.unet, cond2, RES, 8)
    assert added["time_ids"].tolist() == ([expected_ids(*sizes[0]) for sizes in SDXL_SIZES]
                                          + [expected_ids(*sizes[1]) for sizes in SDXL_SIZES])
    x = torch.cat([batch["latents_0"], batch["latents_1"]])
    t = torch.tensor([5, 50, 500, 900] * 2)
    with torch.no_grad():
        out = sdxl.unet(x, t, encoder_hidden_states=cond2["prompt_embeds"], added_cond_kwargs=added).sample
        fixed = added_cond_kwargs(sdxl.unet, batch["cond"], RES, 4)  # no time ids given: (res, res, 0, 0, res, res)
        plain = sdxl.unet(x[:4], t[:4], encoder_hidden_states=batch["cond"]["prompt_embeds"],
                          added_cond_kwargs=fixed).sample
    assert out.shape == (8, 4, 16, 16) and fixed["time_ids"][0].tolist() == [RES, RES, 0, 0, RES, RES]
    assert not torch.allclose(out[:4], plain)  # the stored sizes reach the UNet
    # The empty prompt's single pooled row is broadcast to the batch.
    assert added_cond_kwargs(sdxl.unet, cache.empty_prompt_cond, RES, 2)["text_embeds"].shape == (2, 16)


def test_flip_caches_both_orientations_and_mirrors_the_crop(sdxl, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, size=(49, 40))  # 39 wide after resizing: an off-centre crop
    plain = build_preference_cache(sdxl, manifest, tmp_path / "cache", progress=False, num_workers=0)
    flipped = build_preference_cache(sdxl, manifest, tmp_path / "cache", progress=False, num_workers=0,
                                     random_flip=True)
    assert flipped.key != plain.key and flipped.random_flip and not plain.random_flip
    with pytest.raises(ValueError, match="without random_flip"):
        plain.get(0, [True, False])
    for i in range(len(plain)):
        image = Image.open(tmp_path / f"{i}_0.png")
        mirrored = np.ascontiguousarray(np.asarray(resize_center_crop(image, RES))[:, ::-1])
        item = flipped.get(i, [True, False])
        # The mirrored image's own latents, not the mirrored latents (the VAE is not mirror-equivariant).
        torch.testing.assert_close(item["latents_0"], direct_latents(sdxl.vae, mirrored), **FP16_TOL)
        assert not torch.allclose(item["latents_0"], plain[i]["latents_0"].flip(-1), atol=1e-2)
        assert torch.equal(item["latents_1"], flipped[i]["latents_1"])
        torch.testing.assert_close(flipped[i]["latents_0"], plain[i]["latents_0"], **FP16_TOL)
        # Crop left 3 of a 39-wide resize; mirrored, the same pixels start at 39 - 32 - 3 = 4.
        assert flipped[i]["time_ids_0"].tolist() == [40, 49, 0, 3, RES, RES]
        assert item["time_ids_0"].tolist() == [40, 49, 0, 4, RES, RES]
        assert item["time_ids_1"].tolist() == flipped[i]["time_ids_1"].tolist()


def test_training_batches_mirror_the_images_flip_choices_pick(sdxl, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from diffpref.training.step import draw_micro_batch

    manifest = write_manifest(tmp_path, size=(49, 40))
    cache = build_preference_cache(sdxl, manifest, tmp_path / "cache", progress=False, num_workers=0,
                                   random_flip=True)
    cfg = SimpleNamespace(train_batch_size=4, seed=3, timestep_min=0, prompt_dropout=0.0)
    accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    parts = SimpleNamespace(cfg=cfg, accelerator=accelerator, cache=cache, timestep_high=1000,
                            inversion_points=None, inversion=None)  # no InPO grid here
    for step in range(3):
        mb = draw_micro_batch(parts, step)
        flips = randomness.flip_choices(step, range(4), 2, seed=3)
        for k, index in enumerate(mb.indices.tolist()):
            expected = cache.get(index, flips[k])
            for name in ("latents_0", "latents_1", "time_ids_0", "time_ids_1"):
                assert torch.equal(mb.batch[name][k], expected[name]), (step, k, name)
    assert flips.any() and not flips.all()  # both orientations were drawn


def test_flip_choices_are_a_function_of_seed_step_and_position() -> None:
    first = randomness.flip_choices(7, range(512), 2, seed=1)
    assert first.shape == (512, 2) and torch.equal(first, randomness.flip_choices(7, range(512), 2, seed=1))
    # A process holding positions 256-511 draws what one process draws for them.
    assert torch.equal(first[256:], randomness.flip_choices(7, range(256, 512), 2, seed=1))
    assert 0.4 < first.float().mean() < 0.6  # each image mirrored with probability 1/2
    assert not torch.equal(first[:, 0], first[:, 1])  # the two images of a pair independently
    assert not torch.equal(first, randomness.flip_choices(8, range(512), 2, seed=1))
    assert not torch.equal(first, randomness.flip_choices(7, range(512), 2, seed=2))


def test_key_changes_with_data_and_model_and_reuses_otherwise(sd15, tmp_path: Path, monkeypatch) -> None:
    data = write_parquet(tmp_path / "pairs.parquet")
    root = tmp_path / "cache"
    first = build_preference_cache(sd15, data, root, progress=False)
    meta_mtime = (first.path / "meta.json").stat().st_mtime_ns

    def no_encoding(*args, **kwargs):
        raise AssertionError("a finished cache must be reused without encoding")

    with monkeypatch.context() as patch:
        patch.setattr(builder_module, "encode_images", no_encoding)
        patch.setattr(builder_module, "encode_prompts", no_encoding)
        again = build_preference_cache(sd15, data, root, progress=False)
    assert again.path == first.path and (again.path / "meta.json").stat().st_mtime_ns == meta_mtime

    assert build_preference_cache(sd15, data, root, tie_policy="soft", progress=False).key != first.key

    write_parquet(data, labels=[0.0] + LABELS[1:])  # same rows, one label flipped
    changed_data = build_preference_cache(sd15, data, root, progress=False)
    assert changed_data.key != first.key and changed_data[0]["label"].item() == 0.0

    bias = sd15.vae.decoder.conv_out.bias  # any VAE weight, even one encoding never reads
    original = bias.detach().clone()
    with torch.no_grad():
        bias[0] += 1.0
    try:
        assert build_preference_cache(sd15, data, root, progress=False).key != changed_data.key
    finally:
        with torch.no_grad():
            bias.copy_(original)
    assert build_preference_cache(sd15, data, root, progress=False).key == changed_data.key


def test_manifest_image_change_changes_key(sd15, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path)
    key = build_preference_cache(sd15, manifest, tmp_path / "cache", progress=False).key
    Image.fromarray(noise_image(999, (48, 40))).save(tmp_path / "2_1.png")
    os.utime(tmp_path / "2_1.png", ns=(1, 1))  # a different mtime even on coarse-clock filesystems
    assert build_preference_cache(sd15, manifest, tmp_path / "cache", progress=False).key != key


def test_interrupted_build_is_no_cache_and_the_rerun_resumes(sd15, tmp_path: Path, monkeypatch) -> None:
    data = write_parquet(tmp_path / "pairs.parquet")
    root = tmp_path / "cache"
    calls = []

    def counting(fail_at):
        def encode(*args, **kwargs):
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("killed mid-build")
            return encode_images(*args, **kwargs)
        return encode

    monkeypatch.setattr(layout_module, "CHUNK_ROWS", 2)  # 3 chunks, one VAE call each (batch_size 4)
    with monkeypatch.context() as patch:
        patch.setattr(builder_module, "encode_images", counting(fail_at=2))
        with pytest.raises(RuntimeError, match="killed mid-build"):
            build_preference_cache(sd15, data, root, batch_size=4, progress=False, num_workers=0)
    # Only the build directory is left: never opened as a cache, but its finished chunk is kept.
    (partial,) = root.iterdir()
    assert partial.name.endswith(".partial") and not (partial / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="not a finished cache"):
        PreferenceCache(partial)

    calls.clear()
    with monkeypatch.context() as patch:
        patch.setattr(builder_module, "encode_images", counting(fail_at=-1))
        cache = build_preference_cache(sd15, data, root, batch_size=4, progress=False, num_workers=0)
    assert len(calls) == 2  # the rerun encodes the two chunks that were not finished, not the first
    assert len(cache) == 5 and [p.name for p in root.iterdir()] == [cache.key]
    fresh = build_preference_cache(sd15, data, tmp_path / "fresh", batch_size=4, progress=False, num_workers=0)
    for i in range(len(cache)):
        for name, value in fresh[i].items():
            assert torch.equal(cache[i][name], value), (i, name)


def test_chunks_of_a_manifest_read_each_line_once(sd15, tmp_path: Path, monkeypatch) -> None:
    manifest = write_manifest(tmp_path)
    whole = build_preference_cache(sd15, manifest, tmp_path / "whole", progress=False, num_workers=0)
    monkeypatch.setattr(layout_module, "CHUNK_ROWS", 3)  # lines 0-2 and 3: a chunk boundary mid-file
    cut = build_preference_cache(sd15, manifest, tmp_path / "cut", progress=False, num_workers=0)
    assert cut.meta["chunks"]["rows"] == [3, 1] and cut.meta["report"]["rows"] == whole.meta["report"]["rows"] == 4
    assert (cut.users, cut.prompts) == (whole.users, whole.prompts)
    for i in range(len(whole)):
        for name, value in whole[i].items():
            torch.testing.assert_close(cut[i][name], value, **FP16_TOL)  # other VAE batches: fp rounding only


def test_cache_of_another_version_is_refused_and_rebuilt(sd15, tmp_path: Path, monkeypatch) -> None:
    data = write_parquet(tmp_path / "pairs.parquet")
    cache = build_preference_cache(sd15, data, tmp_path / "cache", progress=False, num_workers=0)
    meta = json.loads((cache.path / "meta.json").read_text())
    (cache.path / "meta.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(ValueError, match="version 1; expected 'pairs' version 2"):
        PreferenceCache(cache.path)
    # The version is key material: a build by another version never finds this directory.
    monkeypatch.setattr(layout_module, "CACHE_VERSION", 3)
    assert build_preference_cache(sd15, data, tmp_path / "cache", progress=False, num_workers=0).key != cache.key


def test_rating_cache_from_pairs_and_from_jsonl(sd15, tmp_path: Path) -> None:
    data = write_parquet(tmp_path / "pairs.parquet")
    root = tmp_path / "cache"
    pairs = build_preference_cache(sd15, data, root, progress=False)
    ratings = build_rating_cache(sd15, data, root, from_pairs=True, progress=False)
    assert len(ratings) == 2 * len(pairs) and ratings.key != pairs.key
    for i in range(len(pairs)):
        pair, liked, disliked = pairs[i], ratings[2 * i], ratings[2 * i + 1]
        assert liked["liked"].item() == 1.0 and disliked["liked"].item() == 0.0
        winner, loser = ("latents_0", "latents_1") if pair["label"] >= 0.5 else ("latents_1", "latents_0")
        torch.testing.assert_close(liked["latents"], pair[winner])
        torch.testing.assert_close(disliked["latents"], pair[loser])
        torch.testing.assert_close(liked["prompt_embeds"], pair["prompt_embeds"])
        assert liked["user_index"] == pair["user_index"]

    Image.fromarray(noise_image(7)).save(tmp_path / "a.png")
    lines = [{"prompt": "a cat", "image": "a.png", "liked": True, "user_id": "x"},
             {"prompt": "a cat", "image": "a.png", "liked": False, "user_id": "y"},
             {"prompt": "a cat", "image": "missing.png", "liked": True}]
    manifest = tmp_path / "ratings.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    from_jsonl = build_rating_cache(sd15, manifest, root, progress=False)
    assert len(from_jsonl) == 2 and from_jsonl.users == ["x", "y"] and from_jsonl.skipped == {"missing_file": 1}
    torch.testing.assert_close(from_jsonl[1]["latents"], direct_latents(sd15.vae, noise_image(7)), **FP16_TOL)
    with pytest.raises(ValueError, match="from_pairs=True"):
        build_rating_cache(sd15, data, root, progress=False)


def test_no_usable_pairs_is_a_clear_error(sd15, tmp_path: Path) -> None:
    data = write_parquet(tmp_path / "ties.parquet", labels=[0.5, 0.5])
    with pytest.raises(DataError, match=r"ties\.parquet: no usable pairs.*'tie': 2"):
        build_preference_cache(sd15, data, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def write_long_manifest(directory: Path, n: int = 12) -> Path:
    """``n`` pair lines, a tie (dropped) at line 4 and a blank line at 7: chunks hold different numbers of rows."""
    lines = []
    for r in range(n):
        for side in (0, 1):
            Image.fromarray(noise_image(300 + 2 * r + side)).save(directory / f"l{r}_{side}.png")
        lines.append(json.dumps({"prompt": f"shape {r % 3}", "image_0": f"l{r}_0.png", "image_1": f"l{r}_1.png",
                                 "label": 0.5 if r == 4 else float(r % 2), "user_id": f"u{r % 4}"}) if r != 7 else "")
    manifest = directory / "long.jsonl"
    manifest.write_text("".join(line + "\n" for line in lines))
    return manifest


def write_ratings_db(path: Path, n: int = 9) -> Path:
    """A rating app database: ``n`` rated pairs (one tie) and a skipped one, which is no preference row."""
    from diffpref.app.store import RatingStore

    with RatingStore(path) as store:
        for user in ("ann", "bob"):
            store.ensure_user(user)
        for r in range(n + 1):
            user = ("ann", "bob")[r % 2]
            ids = [store.add_image(user, f"shape {r % 3}", png(noise_image(500 + 2 * r + side)), "base", r)
                   for side in (0, 1)]
            pair = store.add_pair(user, f"shape {r % 3}", *ids)
            store.rate(user, pair, "skip" if r == 3 else "tie" if r == 6 else ("left", "right")[r % 2])
    return path


def assert_same_cache(cut: PreferenceCache, whole: PreferenceCache) -> None:
    assert (len(cut), cut.users, cut.prompts, cut.skipped) == (len(whole), whole.users, whole.prompts, whole.skipped)
    for i in range(len(whole)):
        expected = whole[i]
        assert cut[i].keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(cut[i][name], value), (i, name)


def test_chunked_jsonl_reads_each_line_once_and_caches_what_one_read_does(sd15, tmp_path: Path, monkeypatch) -> None:
    """Every chunk used to scan the manifest from its first line (quadratic); now the chunks' byte offsets are
    found in one pass and each chunk seeks to its own: 2 x lines in all, whatever the number of chunks."""
    import diffpref.data.manifest as manifest_module

    manifest = write_long_manifest(tmp_path)
    whole = build_preference_cache(sd15, manifest, tmp_path / "whole", batch_size=1, progress=False, num_workers=0)
    assert whole.meta["chunks"]["rows"] == [10]  # one chunk: the file read from its start, as a plain read does
    read = []
    real_open = open

    class Counting:  # the manifest file, counting the lines taken from it
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def seek(self, offset):
            return self.handle.seek(offset)

        def __iter__(self):
            for line in self.handle:
                read.append(line)
                yield line

    monkeypatch.setattr(manifest_module, "open", Counting, raising=False)
    monkeypatch.setattr(layout_module, "CHUNK_ROWS", 2)  # 6 chunks
    cut = build_preference_cache(sd15, manifest, tmp_path / "cut", batch_size=1, progress=False, num_workers=0)
    assert cut.meta["chunks"]["rows"] == [2, 2, 1, 1, 2, 2]  # line 4 a tie, line 7 blank
    assert len(read) == 2 * 12  # the offsets pass, then each line once (the quadratic scan read 3+5+...+12 = 47)
    assert_same_cache(cut, whole)


def test_chunked_ratings_db_fetches_each_rating_once_and_caches_what_one_read_does(sd15, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Chunks of a ratings database start at their rating id (one pass over the ids finds them), so each preference
    row (with its two images) leaves SQLite once; the quadratic scan fetched every row before the chunk too."""
    import diffpref.data.ratings_db as ratings_db_module

    data = write_ratings_db(tmp_path / "app.db")
    whole = build_preference_cache(sd15, data, tmp_path / "whole", batch_size=1, progress=False, num_workers=0)
    assert whole.meta["chunks"]["rows"] == [8] and whole.skipped == {"tie": 1}  # 9 preference rows, a tie dropped
    fetched = {"with images": 0, "ids": 0}
    connect = ratings_db_module.connect_readonly

    class Rows:  # a cursor counting the rows it returns
        def __init__(self, cursor, kind):
            self.cursor, self.kind = cursor, kind

        def __iter__(self):
            for row in self.cursor:
                fetched[self.kind] = fetched.get(self.kind, 0) + 1
                yield row

        def fetchone(self):
            return next(iter(self), None)

    class Counting:  # a connection whose queries count their rows
        def __init__(self, path):
            self.conn = connect(path)

        def execute(self, sql, *params):
            kind = "with images" if "png" in sql else "ids" if sql.startswith("SELECT rating_id") else "other"
            return Rows(self.conn.execute(sql, *params), kind)

        def close(self):
            self.conn.close()

    monkeypatch.setattr(ratings_db_module, "connect_readonly", Counting)
    monkeypatch.setattr(layout_module, "CHUNK_ROWS", 2)  # 5 chunks
    cut = build_preference_cache(sd15, data, tmp_path / "cut", batch_size=1, progress=False, num_workers=0)
    assert cut.meta["chunks"]["rows"] == [2, 2, 1, 2, 1]
    assert fetched["with images"] == 9 and fetched["ids"] == 9  # the quadratic scan fetched 3+5+7+9+9 = 33 rows with images
    assert_same_cache(cut, whole)
    # without the ids, a range is read from its position (OFFSET): the same rows
    from diffpref.data import iter_ratings_db

    plain = [p.source_row for p in iter_ratings_db(data, tie_policy="soft", progress=False)]
    assert [p.source_row for p in iter_ratings_db(data, tie_policy="soft", progress=False, rows=range(3, 7))] == plain[3:7]
