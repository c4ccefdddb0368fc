"""PPD end to end on tiny models: training, the adapter, PersonalizedPipeline, users and mixing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffpref.models.world_clip import build_world_clip, save_world_clip
from diffpref.personalize.backbones import UserExample
from diffpref.training.config import TrainConfig
from diffpref.training.trainer import train
from diffpref.world.render import render, sample_attributes


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_world_clip(build_world_clip(), tmp_path_factory.mktemp("clip") / "world-clip")


@pytest.fixture(scope="module")
def multi_user_manifest(tmp_path_factory):
    """3 users x 4 pairs; user u prefers colour u."""
    root = tmp_path_factory.mktemp("ppd_pairs")
    rng = np.random.default_rng(0)
    colors = ["red", "blue", "green"]
    lines = []
    for u, liked in enumerate(colors):
        for i in range(4):
            other = colors[(u + 1 + i) % 3] if colors[(u + 1 + i) % 3] != liked else colors[(u + 2) % 3]
            render(sample_attributes(rng, color=liked)).save(root / f"{u}_{i}_a.png")
            render(sample_attributes(rng, color=other)).save(root / f"{u}_{i}_b.png")
            lines.append({"prompt": "a shape", "image_0": f"{u}_{i}_a.png", "image_1": f"{u}_{i}_b.png",
                          "label": 1.0, "user_id": f"user{u}"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _ppd_cfg(tmp_path, model_dir, data, clip_dir, **kw):
    base = dict(method="ppd", model=str(model_dir), data_path=str(data), output_dir=str(tmp_path / "out"),
                max_train_steps=3, train_batch_size=4, learning_rate=1e-2, lora_rank=0, checkpointing_steps=2,
                report_to="none", cache_dir=str(tmp_path / "cache"), ppd_backbone=str(clip_dir), ppd_num_tokens=2,
                ppd_shots_max=3, ppd_hidden=16, threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_sd15_dir, multi_user_manifest, clip_dir):
    tmp = tmp_path_factory.mktemp("ppd_run")
    summary = train(_ppd_cfg(tmp, tiny_sd15_dir, multi_user_manifest, clip_dir))
    return tmp / "out", summary


def test_ppd_training_exports_an_adapter_and_leaves_the_base_alone(trained_adapter):
    from safetensors.torch import load_file

    out, summary = trained_adapter
    assert summary["steps"] == 3 and np.isfinite(summary["final"]["loss"])
    config = json.loads((out / "ppd_config.json").read_text())
    assert config["num_tokens"] == 2 and config["trained_users"] == ["user0", "user1", "user2"]
    state = load_file(str(out / "user_attention.safetensors"))
    assert state and all("_user" in k for k in state)
    assert (out / "user_encoder" / "config.json").exists()
    assert not (out / "unet").exists() and not (out / "pytorch_lora_weights.safetensors").exists()


def test_ppd_resume_is_exact(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, trained_adapter):
    from safetensors.torch import load_file

    train(_ppd_cfg(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, max_train_steps=2))
    train(_ppd_cfg(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, resume_from="latest"))
    straight, resumed = trained_adapter[0], tmp_path / "out"
    a, b = load_file(str(straight / "user_attention.safetensors")), load_file(str(resumed / "user_attention.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ea = load_file(str(straight / "user_encoder" / "diffusion_pytorch_model.safetensors"))
    eb = load_file(str(resumed / "user_encoder" / "diffusion_pytorch_model.safetensors"))
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=0)


def _examples(rng, color, k):
    return [UserExample("a shape", render(sample_attributes(rng, color=color)), render(sample_attributes(rng, color="yellow")))
            for _ in range(k)]


@pytest.fixture(scope="module")
def personalized(trained_adapter, tiny_sd15_dir, clip_dir):
    from diffusers import StableDiffusionPipeline

    from diffpref.personalize.backbones import OpenClipBackbone
    from diffpref.personalize.pipeline import PersonalizedPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe = PersonalizedPipeline.from_base(base, trained_adapter[0], backbone=OpenClipBackbone.from_pretrained(clip_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kw):
    return pipe("a shape", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def test_no_user_or_zero_scale_is_exactly_the_base(personalized, tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    base.set_progress_bar_config(disable=True)
    expected = base("a shape", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(_run(personalized), expected)
    np.testing.assert_array_equal(_run(personalized, user_examples=_examples(rng, "red", 2), user_scale=0.0), expected)


def test_users_change_images_and_order_of_examples_does_not(personalized):
    rng = np.random.default_rng(2)
    red = _examples(rng, "red", 3)
    blue = _examples(rng, "blue", 3)
    a = _run(personalized, user_examples=red)
    assert not np.array_equal(a, _run(personalized))
    np.testing.assert_allclose(_run(personalized, user_examples=red[::-1]), a, atol=1e-5)
    tokens_red, tokens_blue = personalized.embed_user(red), personalized.embed_user(blue)
    assert not torch.allclose(tokens_red, tokens_blue)
    np.testing.assert_allclose(_run(personalized, user_embedding=tokens_red), a, atol=1e-5)


def test_bad_user_inputs_are_refused(personalized):
    with pytest.raises(ValueError, match="not both"):
        _run(personalized, user_examples=_examples(np.random.default_rng(0), "red", 1), user_embedding=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="empty"):
        _run(personalized, user_examples=[])
    with pytest.raises(ValueError, match="expects"):
        _run(personalized, user_embedding=torch.zeros(3, 5))


def test_save_and_load_the_personalized_pipeline(personalized, tmp_path, clip_dir):
    from diffusers import StableDiffusionPipeline

    from diffpref.personalize.pipeline import PersonalizedPipeline

    tokens = personalized.embed_user(_examples(np.random.default_rng(3), "green", 2))
    expected = _run(personalized, user_embedding=tokens, user_scale=0.7)
    personalized.save_pretrained(tmp_path / "pp")
    loaded = PersonalizedPipeline.from_pretrained(tmp_path / "pp")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(loaded, user_embedding=tokens, user_scale=0.7), expected, atol=1e-5)
    # The UNet folder inside stays a stock UNet that plain diffusers loads.
    StableDiffusionPipeline.from_pretrained(tmp_path / "pp")


def _write_user_examples(root: Path, name: str, color: str, k: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(k):
        render(sample_attributes(rng, color=color)).save(root / f"{name}_{i}_a.png")
        render(sample_attributes(rng, color="yellow")).save(root / f"{name}_{i}_b.png")
        rows.append({"prompt": "a shape", "image_0": f"{name}_{i}_a.png", "image_1": f"{name}_{i}_b.png", "label": 1})
    return rows


def test_cli_user_embed_and_personalized_batch_generation(tmp_path, trained_adapter, tiny_sd15_dir, clip_dir, capsys):
    from diffpref.cli import main
    from diffpref.personalize.encoder import load_user_embedding

    adapter = trained_adapter[0]
    # The adapter's backbone is the test CLIP saved in a tmp folder; point its config there.
    config = json.loads((adapter / "ppd_config.json").read_text())
    assert config["backbone"] == str(clip_dir)
    alice = _write_user_examples(tmp_path, "alice", "red", 3, 0)
    manifest = tmp_path / "bob.jsonl"
    manifest.write_text("".join(json.dumps({**r, "user_id": "bob"}) + "\n" for r in _write_user_examples(tmp_path, "bob", "blue", 2, 1)))
    assert main(["user", "embed", "--examples", str(manifest), "--out", str(tmp_path / "bob.safetensors"),
                 "--adapter", str(adapter), "--model", str(tiny_sd15_dir), "--device", "cpu"]) == 0
    tokens, meta = load_user_embedding(tmp_path / "bob.safetensors")
    assert tokens.shape == (2, 16) and meta["examples"] == 2
    users = tmp_path / "users.json"
    users.write_text(json.dumps([{"user_id": "alice", "examples": alice}, {"user_id": "bob", "embedding": "bob.safetensors"}]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\na circle\n")
    out = tmp_path / "gen"
    args = ["generate", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_sd15_dir), "--users", str(users),
            "--adapter", str(adapter), "--num-images", "2", "--steps", "2", "--device", "cpu", "--batch-size", "3"]
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == summary["images"] == 2 * 2 * 2
    assert {r["user"] for r in rows} == {"alice", "bob"} and all(r["adapter"] == str(adapter) for r in rows)
    assert all((out / r["file"]).exists() and r["file"].startswith(r["user"] + "/") for r in rows)
    assert (out / "contact_alice.png").exists() and (out / "contact_bob.png").exists()
    assert main(args) == 0  # resumable: nothing left to do
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated"] == 0
    # Interpolation between the two users.
    assert main(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "mix"), "--model", str(tiny_sd15_dir),
                 "--users", str(users), "--adapter", str(adapter), "--mix", "alice:0.7,bob:0.3", "--steps", "2",
                 "--device", "cpu"]) == 0
    assert {json.loads(l)["user"] for l in (tmp_path / "mix" / "metadata.jsonl").read_text().splitlines()} == {"mix_alice0.7_bob0.3"}  # noqa: E741
    assert main(["generate", "--prompts", str(prompts), "--out", str(tmp_path / "bad"), "--model", str(tiny_sd15_dir),
                 "--users", str(users), "--adapter", str(adapter), "--mix", "carol:1", "--device", "cpu"]) == 2
    assert "unknown users" in capsys.readouterr().err


@pytest.mark.slow
def test_personalized_generation_splits_over_two_processes(tmp_path, trained_adapter, tiny_sd15_dir):
    """torchrun with 2 CPU processes: every image is written exactly once."""
    import os
    import subprocess
    import sys

    users = tmp_path / "users.json"
    users.write_text(json.dumps([{"user_id": "alice", "examples": _write_user_examples(tmp_path, "alice", "red", 2, 0)}]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\na circle\na square\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                    "-m", "diffpref.cli", "generate", "--prompts", str(prompts), "--out", str(tmp_path / "gen"),
                    "--model", str(tiny_sd15_dir), "--users", str(users), "--adapter", str(trained_adapter[0]),
                    "--num-images", "3", "--steps", "2", "--device", "cpu"], check=True, env=env)
    rows = [json.loads(line) for line in (tmp_path / "gen" / "metadata.jsonl").read_text().splitlines()]
    files = [r["file"] for r in rows]
    assert len(files) == len(set(files)) == 9
    assert not list((tmp_path / "gen").glob("metadata.rank*.jsonl"))


def test_ppd_user_table_trains_the_encoder_towards_learned_user_tokens(tmp_path, tiny_sd15_dir, multi_user_manifest,
                                                                        clip_dir):
    from diffpref.personalize.encoder import UserEncoder

    summary = train(_ppd_cfg(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, max_train_steps=4,
                             ppd_user_table=True, ppd_token_scale_init=1.0, ppd_preference_weight=0.5))
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert all(np.isfinite(h["distill_mse"]) and h["distill_mse"] > 0 for h in history)
    # Every user starts from the same tokens (a per-user random start is noise no encoder can predict);
    # DPO then moves users apart.
    assert history[0]["table_spread"] == 0.0 and history[-1]["table_spread"] > 0.0
    assert "user_pref_acc" in history[-1] and np.isfinite(summary["final"]["loss"])
    # The table is a training device: the shipped encoder is a plain one that loads as such.
    encoder = UserEncoder.from_pretrained(tmp_path / "out" / "user_encoder")
    assert "user_table" not in dict(encoder.named_parameters())
    assert encoder.config.num_tokens == 2


def test_low_rank_table_trains_and_the_encoder_is_fitted_to_it(tmp_path, tiny_sd15_dir, multi_user_manifest,
                                                                 clip_dir):
    from safetensors.torch import load_file

    summary = train(_ppd_cfg(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, max_train_steps=4,
                             ppd_user_table=True, ppd_table_rank=2, ppd_encoder_fit_steps=3))
    assert np.isfinite(summary["final"]["loss"])
    state = load_file(str(next((tmp_path / "out" / "checkpoints").glob("checkpoint-4/trainable.safetensors"))))
    coords = next(v for k, v in state.items() if k.endswith("user_table"))
    basis = next(v for k, v in state.items() if k.endswith("user_table_basis"))
    assert coords.shape == (3, 2) and basis.shape == (2, 2 * 16) and coords.abs().sum() > 0  # 3 users, rank 2
    config = json.loads((tmp_path / "out" / "ppd_config.json").read_text())
    assert np.isfinite(config["encoder_fit_mse"])
    with pytest.raises(ValueError, match="ppd_user_table: true"):
        _ppd_cfg(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, ppd_table_rank=2)


def test_fit_encoder_to_table_learns_each_users_tokens():
    """Users whose choices differ get the tokens the table holds for them, from a few of those choices."""
    from types import SimpleNamespace

    from diffpref.personalize.context import ContextBank
    from diffpref.personalize.encoder import UserEncoder
    from diffpref.personalize.training import PPDConditioner, add_user_table

    gen = torch.Generator().manual_seed(0)
    users, per_user, width = 4, 16, 8
    # User u prefers whichever image lies further along direction u: their choices reveal u.
    directions = torch.eye(width)[:users] * 3
    image_0, image_1 = torch.randn(users * per_user, width, generator=gen), torch.randn(users * per_user, width, generator=gen)
    user_index = torch.arange(users).repeat_interleave(per_user)
    label = (((image_0 - image_1) * directions[user_index]).sum(1) > 0).float()
    bank = ContextBank(torch.randn(users * per_user, width, generator=gen), image_0, image_1, label, user_index)
    encoder = UserEncoder(feature_dim=bank.feature_dim, num_tokens=2, token_dim=16, hidden=32, layers=0)
    add_user_table(encoder, users, num_tokens=2, dim=16, rank=3, seed=0)
    with torch.no_grad():
        encoder.user_table.copy_(torch.randn(users, 3, generator=gen) * 2)
    cfg = SimpleNamespace(ppd_table_rank=3, learning_rate=3e-3, seed=0, ppd_shots_min=4, ppd_shots_max=8)
    conditioner = PPDConditioner(cfg, encoder, bank, num_tokens=2, users=[str(u) for u in range(users)])
    targets = conditioner.table_tokens(torch.arange(users)).detach()
    table_before = {k: v.clone() for k, v in encoder.named_parameters() if k.startswith("user_table")}

    loss = conditioner.fit_encoder_to_table(steps=300, batch_size=32, progress=False)
    spread = float((targets - targets.mean(0)).pow(2).mean())  # what an encoder blind to the user scores
    with torch.no_grad():
        tokens = encoder(torch.stack([bank.features(bank.by_user[u][:6]) for u in range(users)]))
    assert float((tokens - targets).pow(2).mean()) < 0.1 * spread and loss < 0.1 * spread
    for name, before in table_before.items():  # the targets stay fixed
        torch.testing.assert_close(dict(encoder.named_parameters())[name], before)


def test_ppd_with_text_anchors_trains_exports_and_personalizes(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir):
    from diffusers import StableDiffusionPipeline

    from diffpref.personalize.encoder import UserEncoder
    from diffpref.personalize.pipeline import PersonalizedPipeline

    summary = train(_ppd_cfg(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, ppd_anchors=6,
                             ppd_value_init_scale=0.5, ppd_preference_weight=0.5))
    assert np.isfinite(summary["final"]["loss"])
    encoder = UserEncoder.from_pretrained(tmp_path / "out" / "user_encoder")
    # The only prompt is "a shape": a bank of one content word, with its backbone text direction.
    assert encoder.config.anchor_words == ["shape"] and encoder.config.anchor_evidence
    assert encoder.anchors.shape[0] == 1 and encoder.anchors.abs().sum() > 0
    torch.testing.assert_close(encoder.anchor_directions.norm(dim=-1), torch.ones(1))
    from diffpref.personalize.backbones import OpenClipBackbone

    pipe = PersonalizedPipeline.from_base(StableDiffusionPipeline.from_pretrained(tiny_sd15_dir), tmp_path / "out",
                                          backbone=OpenClipBackbone.from_pretrained(clip_dir))
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(1)
    examples = [UserExample("a shape", render(sample_attributes(rng, color="red")), render(sample_attributes(rng)))]
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=1.0)
    mine = pipe("a shape", user_examples=examples, generator=torch.Generator().manual_seed(0), **kw).images
    base = pipe("a shape", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.isfinite(mine).all() and not np.allclose(mine, base)


def test_ppd_evidence_encoder_trains_exports_and_personalizes(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir):
    from diffusers import StableDiffusionPipeline

    from diffpref.personalize.backbones import OpenClipBackbone
    from diffpref.personalize.encoder import UserEncoder
    from diffpref.personalize.pipeline import PersonalizedPipeline

    with pytest.raises(ValueError, match="ppd_encoder: evidence"):
        _ppd_cfg(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, ppd_encoder="evidence", ppd_user_table=True)
    with pytest.raises(ValueError, match="ppd_encoder"):
        _ppd_cfg(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, ppd_encoder="mlp")
    summary = train(_ppd_cfg(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, ppd_encoder="evidence"))
    assert np.isfinite(summary["final"]["loss"])
    encoder = UserEncoder.from_pretrained(tmp_path / "out" / "user_encoder")
    assert encoder.config.evidence_dim * 4 == encoder.config.feature_dim
    assert encoder.evidence_map.weight.abs().sum() > 0  # DPO moved the map away from its user-blind zero start
    assert float(encoder.evidence_scale) != 1.0  # set from the training pairs' differences
    pipe = PersonalizedPipeline.from_base(StableDiffusionPipeline.from_pretrained(tiny_sd15_dir), tmp_path / "out",
                                          backbone=OpenClipBackbone.from_pretrained(clip_dir))
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(1)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=1.0)

    def generate(color):
        examples = [UserExample("a shape", render(sample_attributes(rng, color=color)), render(sample_attributes(rng)))]
        return pipe("a shape", user_examples=examples, generator=torch.Generator().manual_seed(0), **kw).images

    red, blue = generate("red"), generate("blue")
    assert np.isfinite(red).all() and not np.allclose(red, blue)  # different choices, different images


def test_ppd_attention_lr_sets_the_user_projections_own_rate(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir):
    """A zero rate for the user projections keeps them at their initial (scaled) copies while the head trains."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    train(_ppd_cfg(tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, ppd_attention_lr=0.0,
                   ppd_value_init_scale=0.5, checkpointing_steps=0))
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
    base = {name: m for name, m in unet.named_modules() if name.endswith("attn2")}
    saved = load_file(str(tmp_path / "out" / "user_attention.safetensors"))
    assert saved
    for key, weight in saved.items():
        layer = base[key.split(".processor.")[0]]
        expected = layer.to_k.weight if key.endswith("to_k_user.weight") else 0.5 * layer.to_v.weight
        torch.testing.assert_close(weight, expected)
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["lr"] > 0 and history[-1]["attention_lr"] == 0.0


def test_ppd_init_adapter_starts_from_its_weights_and_policy_pairs_are_never_context(
        tmp_path, tiny_sd15_dir, multi_user_manifest, clip_dir, trained_adapter):
    """``ppd_init_adapter`` loads a trained adapter (at lr 0 it comes out unchanged), and pairs that hold a
    personalized image (``model_0/1 = ppd-policy:...``) train but never serve as a user's context."""
    from safetensors.torch import load_file

    from diffpref.personalize.context import ContextBank

    root = multi_user_manifest.parent
    rows = [json.loads(line) for line in multi_user_manifest.read_text().splitlines()]
    for row in rows:
        row["image_0"], row["image_1"] = str(root / row["image_0"]), str(root / row["image_1"])
    rng = np.random.default_rng(5)
    policy = []
    for u in range(3):  # one on-policy pair per user, with images no base pair has
        for side, color in (("a", "purple"), ("b", "orange")):
            render(sample_attributes(rng, color=color)).save(tmp_path / f"policy{u}{side}.png")
        policy.append({"prompt": "a shape", "image_0": str(tmp_path / f"policy{u}a.png"), "label": 1.0,
                       "image_1": str(tmp_path / f"policy{u}b.png"), "user_id": f"user{u}",
                       "model_0": f"ppd-policy:user{u}:0", "model_1": "embedded"})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows + policy))
    summary = train(_ppd_cfg(tmp_path, tiny_sd15_dir, data, clip_dir, ppd_init_adapter=str(trained_adapter[0]),
                             learning_rate=0.0, ppd_attention_lr=0.0, max_train_steps=2))
    assert np.isfinite(summary["final"]["loss"])
    for name in ("user_attention.safetensors", "user_encoder/diffusion_pytorch_model.safetensors"):
        start, end = load_file(str(trained_adapter[0] / name)), load_file(str(tmp_path / "out" / name))
        assert start.keys() == end.keys()
        for k in start:
            torch.testing.assert_close(end[k], start[k], rtol=0, atol=0)

    [bank_file] = (tmp_path / "cache").rglob("context-*.safetensors")
    bank = ContextBank.load(bank_file)
    assert bank.context_ok.tolist() == [True] * len(rows) + [False] * len(policy)
    every = torch.arange(len(bank.label))
    features, mask = bank.sample_context(every, [torch.Generator().manual_seed(i) for i in every.tolist()], 3, 3)
    policy_features = bank.features(torch.arange(len(rows), len(bank.label)))
    assert mask.sum() == 3 * len(every)  # every user has 3 other base-image pairs
    assert not any(torch.equal(drawn, p) for drawn in features[mask] for p in policy_features)

    # A user whose only base-image pair is the trained one has no context to draw.
    lonely = ContextBank(bank.text[:2], bank.image_0[:2], bank.image_1[:2], bank.label[:2],
                         torch.zeros(2, dtype=torch.long), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="no context pair besides this one"):
        lonely.sample_context(torch.tensor([0]), [torch.Generator()], 1, 1)
    assert lonely.sample_context(torch.tensor([1]), [torch.Generator()], 1, 1)[1].sum() == 1

    with pytest.raises(ValueError, match="ppd_init_adapter .* makes 2 user tokens, this config 3"):
        train(_ppd_cfg(tmp_path / "bad", tiny_sd15_dir, data, clip_dir, ppd_init_adapter=str(trained_adapter[0]),
                       ppd_num_tokens=3))


def test_per_image_user_tokens_are_split_into_batches_with_their_prompts(personalized):
    """``iter_generated`` with [N, K, d] tokens gives every image its own user, whatever the batch size:
    the same images as generating each image alone with its user's tokens."""
    from diffpref.generate import generate_all, generate_images

    rng = np.random.default_rng(3)
    users = [personalized.embed_user(_examples(rng, color, 2)) for color in ("red", "blue", "green")]
    prompts, seeds = ["a shape", "a star", "a shape"], [1, 2, 3]
    kw = dict(height=32, width=32, user_scale=1.0)
    together = generate_all(personalized, prompts, seeds, 2, 1.0, batch_size=2, progress=False,
                            user_embedding=torch.stack(users), **kw)
    alone = np.concatenate([generate_images(personalized, [p], [s], 2, 1.0, user_embedding=u, **kw)
                            for p, s, u in zip(prompts, seeds, users)])
    np.testing.assert_allclose(together.astype(int), alone.astype(int), atol=1)
    # one user for all: [K, d] is broadcast, not split
    shared = generate_all(personalized, prompts, seeds, 2, 1.0, batch_size=2, progress=False,
                          user_embedding=users[0], **kw)
    np.testing.assert_allclose(shared[1:2].astype(int), generate_images(
        personalized, prompts[1:2], seeds[1:2], 2, 1.0, user_embedding=users[0], **kw).astype(int), atol=1)
    assert not np.array_equal(together[1], shared[1])  # the blue user's image is not the red user's
