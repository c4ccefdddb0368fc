"""PPD on SDXL: configs/sdxl_ppd.yaml trains an adapter on a tiny SDXL pipeline, PersonalizedPipeline loads it
(two text encoders, pooled embeddings, added time ids), user scale 0 is the base bit for bit, and
`diffpref generate --users` runs with it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ppd import (
    _write_user_examples,  # one user's (color over yellow) examples, shared
)

from diffpref.models.world_clip import build_world_clip, save_world_clip
from diffpref.personalize.backbones import UserExample
from diffpref.world.render import render, sample_attributes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    from diffpref.models.builders import tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl_pipeline(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save_world_clip(build_world_clip(), tmp_path_factory.mktemp("clip") / "world-clip")


@pytest.fixture(scope="module")
def sdxl_adapter(tmp_path_factory, tiny_sdxl_dir, clip_dir):
    """configs/sdxl_ppd.yaml, its keys as shipped except model, data, backbone, sizes and steps."""
    from diffpref.config import load_config
    from diffpref.launch import build_parts
    from diffpref.training.config import TrainConfig
    from diffpref.training.trainer import train

    tmp = tmp_path_factory.mktemp("sdxl_ppd")
    rows = [{**r, "user_id": f"user{u}"} for u, color in enumerate(["red", "blue"]) for r in _write_user_examples(tmp, f"u{u}", color, 3, u)]
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"model={tiny_sdxl_dir}", f"data_path={data}", f"output_dir={tmp / 'out'}", f"cache_dir={tmp / 'cache'}",
                 f"ppd_backbone={clip_dir}", "max_train_steps=2", "train_batch_size=2", "gradient_accumulation_steps=1",
                 "resolution=32", "mixed_precision=no", "gradient_checkpointing=false", "checkpointing_steps=0",
                 "report_to=none", "ppd_hidden=16", "ppd_shots_max=2", "ppd_user_dropout=0", "learning_rate=1e-3",
                 "threads=1", "eval_prompts=0"]
    cfg = load_config(TrainConfig, REPO / "configs" / "sdxl_ppd.yaml", overrides)
    assert cfg.conditioning == "ppd" and cfg.ppd_encoder == "set" and cfg.lora_rank == 0
    summary = train(cfg, *build_parts(cfg))
    return tmp / "out", summary


def test_sdxl_ppd_config_trains_an_adapter_from_log_2(sdxl_adapter, tiny_sdxl_dir):
    import math

    out, summary = sdxl_adapter
    assert summary["steps"] == 2
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history[0]["loss"] == float(torch.tensor(math.log(2)))  # a fresh adapter starts as the base model
    config = json.loads((out / "ppd_config.json").read_text())
    assert config["token_dim"] == 32 and config["base_model"] == str(tiny_sdxl_dir)


@pytest.fixture(scope="module")
def personalized(sdxl_adapter, tiny_sdxl_dir, clip_dir):
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.backbones import OpenClipBackbone
    from diffpref.personalize.pipeline import (
        PersonalizedPipeline,
        PersonalizedSDXLPipeline,
    )

    pipe = PersonalizedPipeline.from_base(load_pipeline(str(tiny_sdxl_dir), device="cpu"), sdxl_adapter[0],
                                          backbone=OpenClipBackbone.from_pretrained(clip_dir))
    assert isinstance(pipe, PersonalizedSDXLPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


KW = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def _run(pipe, **kw):
    return pipe("a shape", generator=torch.Generator().manual_seed(0), **KW, **kw).images


def _examples(seed: int, color: str, k: int = 2) -> list[UserExample]:
    rng = np.random.default_rng(seed)
    return [UserExample("a shape", render(sample_attributes(rng, color=color)), render(sample_attributes(rng, color="yellow")))
            for _ in range(k)]


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_sdxl_user_scale_0_and_no_user_are_the_base_bit_for_bit(personalized, tiny_sdxl_dir, guidance_scale):
    from diffusers import StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base.set_progress_bar_config(disable=True)
    expected = base("a shape", generator=torch.Generator().manual_seed(0), guidance_scale=guidance_scale, **KW).images
    np.testing.assert_array_equal(_run(personalized, guidance_scale=guidance_scale), expected)
    np.testing.assert_array_equal(
        _run(personalized, user_examples=_examples(0, "red"), user_scale=0.0, guidance_scale=guidance_scale), expected)
    # a trained user changes the image (through both guidance halves: the unconditional one sees no user)
    assert not np.array_equal(_run(personalized, user_examples=_examples(0, "red"), guidance_scale=guidance_scale), expected)


def test_sdxl_personalized_pipeline_saves_and_loads(personalized, tmp_path):
    from diffpref.personalize.pipeline import (
        PersonalizedPipeline,
        PersonalizedSDXLPipeline,
    )

    tokens = personalized.embed_user(_examples(1, "blue"))
    expected = _run(personalized, user_embedding=tokens, user_scale=0.7)
    personalized.save_pretrained(tmp_path / "pp")
    loaded = PersonalizedPipeline.from_pretrained(tmp_path / "pp")  # the folder says it is SDXL
    assert isinstance(loaded, PersonalizedSDXLPipeline)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(_run(loaded, user_embedding=tokens, user_scale=0.7), expected, atol=1e-5)


def test_generate_users_loads_the_sdxl_adapter(sdxl_adapter, tiny_sdxl_dir, tmp_path, capsys):
    from diffpref.cli import main

    users = tmp_path / "users.json"
    users.write_text(json.dumps([{"user_id": "alice", "examples": _write_user_examples(tmp_path, "alice", "red", 2, 5)}]))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a star\n")
    out = tmp_path / "gen"
    capsys.readouterr()
    assert main(["generate", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_sdxl_dir), "--users",
                 str(users), "--adapter", str(sdxl_adapter[0]), "--steps", "2", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["user"] for r in rows] == ["alice"] and (out / rows[0]["file"]).exists()
