"""PPD with a vision-language backbone, on tiny random LLaVA-OneVision and Qwen2-VL models built here (nothing
downloaded): the examples in one prompt through the chat template, hidden states as features, the token budget,
the precomputed context sets (sharded, cached), training a few steps, and loading the adapter for generation."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffpref.personalize.backbones import UserExample, VLMBackbone, backbone_kind
from diffpref.world.render import render, sample_attributes

# The chat templates put each image's placeholder where the content says; a generation prompt closes the turn.
TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} profile :{% endif %}")
WORDS = ["Here", "are", "captions", "and", ",", "for", "each", "the", "image", "a", "user", "preferred", "they", "did",
         "not", ".", "Caption", ":", "shape", "star", "circle", "Preferred", "Dispreferred", "Describe", "this", "'",
         "s", "visual", "preferences", "in", "one", "short", "profile"]


def _tokenizer(specials: list[str]):
    """A word-level tokenizer built in memory (no files, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "<pad>", "<s>", "</s>", *specials, *WORDS]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=specials)


def _text_config(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_llava_onevision(path: Path) -> Path:
    """SigLIP tower (32 px, patch 8: 16 tokens a view) + Qwen2 text model, one 32 px grid (anyres_max_1)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = _tokenizer(["<image>", "<video>"])
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=[[32, 32]]),
        tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=16,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1", chat_template=TEMPLATE.replace("IMAGE", "<image>"))
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=32, patch_size=8),
        text_config=Qwen2Config(**_text_config(tokenizer)), image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=[[32, 32]], vision_aspect_ratio="anyres_max_1")
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_qwen2_vl(path: Path) -> Path:
    """Qwen2-VL vision tower (patch 14, 2x2 merge) + text model; images of 28-56 px -> 1-4 image tokens."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer(specials)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56), tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>"))
    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end", "image_pad", "video_pad")}
    config = Qwen2VLConfig(
        text_config={**_text_config(tokenizer), "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config=dict(depth=2, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["image_pad"], video_token_id=ids["video_pad"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


BUILDERS = {"llava_onevision": build_llava_onevision, "qwen2_vl": build_qwen2_vl}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm_dir(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp("vlm") / request.param)


def _examples(k: int, seed: int = 0, size: int = 48) -> list[UserExample]:
    rng = np.random.default_rng(seed)
    return [UserExample("a shape", render(sample_attributes(rng, color="red")).resize((size, size)),
                        render(sample_attributes(rng, color="blue")).resize((size, size))) for _ in range(k)]


def test_vlm_backbone_reads_the_examples_in_one_prompt(vlm_dir):
    assert backbone_kind(vlm_dir) == "vlm" and backbone_kind("embedded") == "open_clip"
    backbone = VLMBackbone.from_pretrained(vlm_dir, max_new_tokens=2, image_size=32)
    assert type(backbone.model).__name__ in ("LlavaOnevisionForConditionalGeneration", "Qwen2VLForConditionalGeneration")
    examples = _examples(3)
    prompt = backbone.build_prompt(examples)
    assert prompt.endswith(" profile :") and prompt.count("Dispreferred image:") == 3  # the chat template
    features = backbone.embed_examples(examples)
    assert features.shape == (1, 3 * 16) and torch.isfinite(features).all() and backbone.last_kept == 3
    torch.testing.assert_close(backbone.embed_examples(examples), features, rtol=0, atol=0)  # greedy: deterministic
    assert not torch.equal(backbone.embed_examples(_examples(3, seed=4)), features)
    # images are resized first: any input size costs the same tokens
    assert backbone.prompt_length(_examples(2, size=40)) == backbone.prompt_length(_examples(2, size=64))
    # no profile: the last prompt token's states
    assert VLMBackbone(backbone.model, backbone.processor, max_new_tokens=0, image_size=32).embed_examples(examples).shape == (1, 48)


def test_token_budget_keeps_the_examples_that_fit(vlm_dir):
    backbone = VLMBackbone.from_pretrained(vlm_dir, max_new_tokens=2, image_size=32)
    one, three = backbone.prompt_length(_examples(1)), backbone.prompt_length(_examples(3))
    budget = VLMBackbone.from_pretrained(vlm_dir, max_new_tokens=2, image_size=32, max_tokens=(one + three) // 2 + 2)
    kept = budget.fit(_examples(4))
    assert 1 <= len(kept) < 3 and budget.prompt_length(kept) + 2 <= budget.max_tokens
    budget.embed_examples(_examples(4))
    assert budget.last_kept == len(kept)
    with pytest.raises(ValueError, match="lower image_size"):
        VLMBackbone.from_pretrained(vlm_dir, max_new_tokens=2, image_size=32, max_tokens=one - 1).fit(_examples(2))
    with pytest.raises(ValueError, match="context length"):
        VLMBackbone.from_pretrained(vlm_dir, max_tokens=10**6)


def test_context_sets_never_hold_the_trained_pair():
    from diffpref.personalize.vlm_context import VLMContextBank, sample_context_sets

    user_index = torch.tensor([0, 0, 0, 1, 1, 2, 1])
    context_ok = torch.tensor([True, True, True, True, True, True, False])  # row 6: an on-policy pair
    sets = sample_context_sets(user_index, context_ok, subsets=3, k_min=1, k_max=4, seed=0)
    assert sets == sample_context_sets(user_index, context_ok, subsets=3, k_min=1, k_max=4, seed=0)
    assert {u for u, _ in sets} == {0, 1}  # user 2 has one pair: no set
    for j, (user, rows) in enumerate(sets):
        assert rows and all(int(user_index[r]) == user and bool(context_ok[r]) for r in rows) and 6 not in rows
    assert [0 not in rows for u, rows in sets if u == 0][0]  # set 0 of a user leaves out its first pair
    bank = VLMContextBank(torch.arange(len(sets), dtype=torch.float32).unsqueeze(1).repeat(1, 2),
                          torch.tensor([u for u, _ in sets]),
                          torch.tensor([rows + [-1] * (4 - len(rows)) for _, rows in sets]), user_index)
    assert bank.has_context(torch.arange(7)).tolist() == [True] * 5 + [False, True]
    assert bank.dropped_pairs == 1 and "1 of 7 pairs" in bank.skip_message
    for row in range(7):
        features, mask = bank.sample_context(torch.tensor([row] * 20), [torch.Generator().manual_seed(i) for i in range(20)])
        assert mask.all() and features.shape == (20, 1, 2)
        if row == 5:
            assert torch.count_nonzero(features) == 0
            continue
        for value in features[:, 0, 0].tolist():  # the set's index: its rows must leave the trained one out
            assert row not in sets[int(value)][1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """2 users x 3 pairs; user u prefers colour u."""
    root = tmp_path_factory.mktemp("vlm_pairs")
    rng = np.random.default_rng(0)
    lines = []
    for u, (liked, other) in enumerate([("red", "blue"), ("blue", "red")]):
        for i in range(3):
            render(sample_attributes(rng, color=liked)).save(root / f"{u}_{i}_a.png")
            render(sample_attributes(rng, color=other)).save(root / f"{u}_{i}_b.png")
            lines.append({"prompt": "a shape", "image_0": f"{u}_{i}_a.png", "image_1": f"{u}_{i}_b.png", "label": float(i % 2),
                          "user_id": f"user{u}"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _cfg(tmp_path, model, data, vlm, **kw):
    from diffpref.training.config import TrainConfig

    base = dict(method="ppd", model=str(model), data_path=str(data), output_dir=str(tmp_path / "out"), max_train_steps=2,
                train_batch_size=2, learning_rate=1e-3, lora_rank=0, checkpointing_steps=0, report_to="none",
                cache_dir=str(tmp_path / "cache"), ppd_backbone=str(vlm), ppd_num_tokens=2, ppd_shots_max=3, ppd_hidden=16,
                ppd_user_dropout=0.0, ppd_vlm_subsets=3, ppd_vlm_image_size=32, ppd_vlm_max_new_tokens=2, threads=1,
                eval_prompts=0)
    base.update(kw)
    return TrainConfig(**base)


class _Rank:
    """An accelerator as one process of ``world`` sees it (the barrier is the caller's business)."""

    def __init__(self, rank: int, world: int, stop_at_barrier: bool = False):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.stop_at_barrier = stop_at_barrier

    def wait_for_everyone(self):
        if self.stop_at_barrier:
            raise _Barrier


class _Barrier(Exception):
    pass


def test_context_sets_are_sharded_across_processes_and_cached(tmp_path, tiny_sd15_dir, manifest, vlm_dir):
    from diffusers import StableDiffusionPipeline

    from diffpref.personalize.vlm_context import build_vlm_context_bank
    from diffpref.training.cache import build_preference_cache

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    cfg = _cfg(tmp_path, tiny_sd15_dir, manifest, vlm_dir)
    backbone = VLMBackbone.from_pretrained(vlm_dir, max_new_tokens=2, image_size=32)
    one = build_vlm_context_bank(build_preference_cache(pipe, str(manifest), tmp_path / "c1", progress=False),
                                 backbone, cfg, _Rank(0, 1), progress=False)
    assert one.features.shape == (2 * 3, 48) and one.has_context(torch.arange(6)).all()
    cache = build_preference_cache(pipe, str(manifest), tmp_path / "c2", progress=False)
    with pytest.raises(_Barrier):  # process 1 embeds its users' sets, then waits for process 0
        build_vlm_context_bank(cache, backbone, cfg, _Rank(1, 2, stop_at_barrier=True), progress=False)
    [folder] = Path(cache.path).glob("vlm-context-*")
    assert [p.name for p in folder.iterdir()] == ["shard-00001-of-00002.safetensors"]
    two = build_vlm_context_bank(cache, backbone, cfg, _Rank(0, 2), progress=False)  # its share, then the merge
    for name in ("features", "set_user", "set_rows", "user_index"):
        torch.testing.assert_close(getattr(two, name), getattr(one, name), rtol=0, atol=1e-6)
    from safetensors.torch import load_file

    shares = [len(load_file(str(p))["index"]) for p in sorted(folder.glob("shard-*"))]
    assert shares == [3, 3]  # each process embedded one user's 3 sets
    # cached: a later run reads the bank, the backbone is not called
    backbone.embed_examples = None
    torch.testing.assert_close(build_vlm_context_bank(cache, backbone, cfg, _Rank(0, 1), progress=False).features, one.features)


def test_context_bank_reads_each_needed_row_once_not_the_whole_data_per_pass(tmp_path, tiny_sd15_dir, manifest, vlm_dir,
                                                                              monkeypatch):
    """The bank used to re-read the whole data for every group of PAIRS_PER_PASS pairs (and once before): images
    decoded, counted here at the reader, are now one read of the data, plus each group's own chunks only when
    the images do not fit in memory; the features are those of the sets embedded directly."""
    import shutil

    from diffusers import StableDiffusionPipeline

    import diffpref.data.manifest as manifest_module
    import diffpref.training.cache.layout as layout_module
    from diffpref.data import read_jsonl_manifest
    from diffpref.personalize import vlm_context
    from diffpref.personalize.vlm_context import build_vlm_context_bank
    from diffpref.training.cache import build_preference_cache

    monkeypatch.setattr(layout_module, "CHUNK_ROWS", 3)  # chunk u holds user u's 3 pairs
    cache = build_preference_cache(StableDiffusionPipeline.from_pretrained(tiny_sd15_dir), str(manifest),
                                   tmp_path / "cache", progress=False, num_workers=0)
    assert cache.meta["chunks"]["rows"] == [3, 3]
    decoded = []
    decode = manifest_module.decode_image
    monkeypatch.setattr(manifest_module, "decode_image", lambda *a, **k: decoded.append(a[0]) or decode(*a, **k))
    cfg = _cfg(tmp_path, tiny_sd15_dir, manifest, vlm_dir)
    backbone = VLMBackbone.from_pretrained(vlm_dir, max_new_tokens=2, image_size=32)
    banks = {}
    for per_pass, images in ((2048, 12), (3, 24)):  # 3: a group per user, reading its own chunk (was 12 + 2 x 12)
        monkeypatch.setattr(vlm_context, "PAIRS_PER_PASS", per_pass)
        decoded.clear()
        banks[per_pass] = build_vlm_context_bank(cache, backbone, cfg, _Rank(0, 1), progress=False)
        assert len(decoded) == images, per_pass
        assert len(set(decoded)) == 12  # every image of the 6 pairs
        shutil.rmtree(next(Path(cache.path).glob("vlm-context-*")))
    pairs = read_jsonl_manifest(manifest).pairs
    bank = banks[2048]
    for s in range(len(bank.set_user)):
        rows = [r for r in bank.set_rows[s].tolist() if r >= 0]
        examples = [UserExample(pairs[r].prompt, *((pairs[r].image_0, pairs[r].image_1) if pairs[r].label >= 0.5
                                                   else (pairs[r].image_1, pairs[r].image_0))) for r in rows]
        assert all(int(bank.user_index[r]) == int(bank.set_user[s]) for r in rows)
        assert torch.equal(bank.features[s], backbone.embed_examples(examples)[0].to(torch.bfloat16)), s
    for name in ("features", "set_user", "set_rows", "user_index"):
        assert torch.equal(getattr(banks[3], name), getattr(bank, name)), name


@pytest.mark.slow
def test_two_processes_build_the_one_process_context_bank(tmp_path, manifest, vlm_dir):
    """torchrun, 2 gloo processes: each embeds its users' sets (3 of 6), and the merged bank equals one process's."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"out-{processes}.json"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = (launcher if processes > 1 else [sys.executable]) + [
            str(root / "tests" / "vlm_context_worker.py"), str(manifest), str(vlm_dir), str(tmp_path / f"run-{processes}"), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        run = subprocess.run(command, check=False, env=env, cwd=root, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        results[processes] = json.loads(out.read_text())
    assert results[1]["sets_per_rank"] == [6] and results[2]["sets_per_rank"] == [3, 3]
    one, two = load_file(results[1]["bank"]), load_file(results[2]["bank"])
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_ppd_trains_with_a_vlm_backbone_and_the_adapter_generates(tmp_path, tiny_sd15_dir, manifest, vlm_dir, capsys):
    from diffpref.cli import main
    from diffpref.launch import build_parts
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.encoder import load_user_embedding
    from diffpref.personalize.pipeline import PersonalizedPipeline
    from diffpref.training.trainer import train

    cfg = _cfg(tmp_path, tiny_sd15_dir, manifest, vlm_dir)
    summary = train(cfg, *build_parts(cfg))
    assert summary["steps"] == 2
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert history[0]["loss"] == float(torch.tensor(math.log(2)))
    adapter = tmp_path / "out"
    config = json.loads((adapter / "ppd_config.json").read_text())
    assert config["backbone"] == str(vlm_dir) and config["backbone_kind"] == "vlm" and config["feature_dim"] == 48
    assert config["vlm"] == {"max_new_tokens": 2, "layer_pooling": "concat", "image_size": 32, "max_tokens": 1024,
                             "dtype": "float32"}

    pipe = PersonalizedPipeline.from_base(load_pipeline(str(tiny_sd15_dir), device="cpu"), adapter)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.backbone, VLMBackbone) and pipe.backbone.settings == config["vlm"]  # as trained
    kw = dict(num_inference_steps=2, output_type="np", guidance_scale=1.0)
    base = pipe("a shape", generator=torch.Generator().manual_seed(0), **kw).images
    user = pipe("a shape", user_examples=_examples(2), generator=torch.Generator().manual_seed(0), **kw).images
    assert np.isfinite(user).all() and not np.array_equal(user, base)

    rows = []
    for i, ex in enumerate(_examples(2, seed=3)):
        ex.preferred.save(tmp_path / f"p{i}.png")
        ex.rejected.save(tmp_path / f"r{i}.png")
        rows.append({"prompt": ex.prompt, "image_0": f"p{i}.png", "image_1": f"r{i}.png", "label": 1})
    examples = tmp_path / "alice.jsonl"
    examples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["user", "embed", "--examples", str(examples), "--out", str(tmp_path / "alice.safetensors"),
                 "--adapter", str(adapter), "--model", str(tiny_sd15_dir), "--device", "cpu"]) == 0
    tokens, _ = load_user_embedding(tmp_path / "alice.safetensors")
    assert tokens.shape == (2, 16)
    users = tmp_path / "users.json"
    users.write_text(json.dumps([{"user_id": "alice", "embedding": "alice.safetensors"},
                                 {"user_id": "bob", "examples": rows}]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\n")
    capsys.readouterr()
    assert main(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "gen"), "--model", str(tiny_sd15_dir),
                 "--users", str(users), "--adapter", str(adapter), "--steps", "2", "--device", "cpu"]) == 0
    made = [json.loads(line) for line in (tmp_path / "gen" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["user"] for r in made) == ["alice", "bob"]


def test_the_app_runs_with_a_vlm_adapter(tmp_path, tiny_sd15_dir, manifest, vlm_dir):
    """The rating app loads a VLM-backbone adapter: pairs (random: a VLM has no per-image embedding for the active
    choice), ratings, the person's tokens from their choices, a personalized image, and a profile that says why
    it has no CLIP probes."""
    from diffpref.app.config import AppConfig
    from diffpref.app.service import RatingService
    from diffpref.launch import build_parts
    from diffpref.training.trainer import train

    cfg = _cfg(tmp_path, tiny_sd15_dir, manifest, vlm_dir, max_train_steps=1)
    train(cfg, *build_parts(cfg))
    service = RatingService(AppConfig(model=str(tiny_sd15_dir), adapter=str(tmp_path / "out"), db=str(tmp_path / "r.db"),
                                      steps=1, profile="clip", candidates=3, profile_seeds=1, pair_mode="active"),
                            start_worker=False)
    try:
        assert not service.image_features
        service.login("ann")
        pair = service.next_pair("ann")
        service.rate("ann", pair["pair_id"], "left")
        tokens = service.user_tokens("ann")
        assert tokens is not None and tokens.shape == (2, 16)
        assert service.generate("ann", "a star", 0)["personalized"] is not None
        assert service.profile("ann")["method"] is None
    finally:
        service.close()


def test_a_vlm_backbone_refuses_the_evidence_head(tmp_path, tiny_sd15_dir, manifest, vlm_dir):
    from diffpref.launch import build_parts
    from diffpref.training.trainer import train

    cfg = _cfg(tmp_path, tiny_sd15_dir, manifest, vlm_dir, ppd_encoder="evidence")
    with pytest.raises(ValueError, match="use ppd_encoder: set"):
        train(cfg, *build_parts(cfg))
