"""Tuned-vs-base oracle evaluation: the arithmetic, adapter loading, and the CLI."""

import json

import numpy as np
import pytest

from diffpref.cli import main
from diffpref.experiments.preference_eval import compare, eval_prompts
from diffpref.models.loading import load_adapter
from diffpref.world.render import render, sample_attributes
from diffpref.world.users import WorldUser


def _renders(rng, n, **fixed):
    return np.stack([np.asarray(render(sample_attributes(rng, **fixed))) for _ in range(n)])


def test_compare_counts_wins_by_each_users_oracle():
    rng = np.random.default_rng(0)
    red = _renders(rng, 10, color="red", shape="star", background="white")
    blue = _renders(rng, 10, color="blue", shape="star", background="white")
    prompts = ["a star on a white background"] * 10
    likes_red = WorldUser("r", {"color:red": 1.0})
    likes_blue = WorldUser("b", {"color:blue": 1.0})
    indifferent = WorldUser("i", {"shape:circle": 1.0})  # every image scores 0: all ties
    result = compare(red, blue, prompts, [likes_red, likes_blue, indifferent])
    assert result["per_user"]["r"]["win_rate"] == 1.0
    assert result["per_user"]["b"]["win_rate"] == 0.0
    assert result["per_user"]["i"]["win_rate"] == 0.5
    assert result["win_rate_vs_base"] == pytest.approx(0.5)
    assert result["adherence"] == result["base_adherence"] == 1.0


def test_eval_prompts_are_fixed_by_seed():
    assert eval_prompts(20, 3) == eval_prompts(20, 3)
    assert eval_prompts(20, 3) != eval_prompts(20, 4)


def test_load_adapter_errors(tmp_path, tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(pipe, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_adapter(pipe, tmp_path)
    # A full UNet folder is swapped in: the pipeline then holds the saved (changed) weights.
    import torch

    tuned = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir).unet
    with torch.no_grad():
        tuned.conv_out.bias.add_(1.0)
    tuned.save_pretrained(tmp_path / "tuned" / "unet")
    before = pipe.unet.conv_out.bias.detach().clone()
    loaded = load_adapter(pipe, tmp_path / "tuned").unet.conv_out.bias.detach()
    assert torch.equal(loaded, before + 1.0)


def test_training_evaluator_attach_then_call(tiny_sd15_dir):
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline

    from diffpref.experiments.preference_eval import TrainingEvaluator

    users = [WorldUser("r", {"color:red": 1.0}), WorldUser("b", {"color:blue": 1.0})]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    cfg = SimpleNamespace(model=pipe, eval_prompts=3, seed=0, eval_sampling_steps=1)
    evaluator = TrainingEvaluator(cfg, users)
    with pytest.raises(RuntimeError, match="attach"):
        evaluator(0)
    training_unet = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir).unet.train()
    evaluator.attach(training_unet, type(pipe), 64)
    result = evaluator(1)
    # The training UNet equals the base one: every image ties, and the pipeline and the UNet are given back.
    assert result["win_rate_vs_base"] == 0.5 and result["adherence"] == result["base_adherence"]
    assert pipe.unet is not training_unet and training_unet.training


def test_world_eval_cli_with_adapter(tmp_path, tiny_sd15_dir, capsys):
    users = tmp_path / "users.json"
    users.write_text(json.dumps([{"user_id": "r", "weights": {"color:red": 1.0}}]))
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_pretrained(tiny_sd15_dir / "unet").save_pretrained(tmp_path / "tuned" / "unet")
    code = main(["world", "eval", "--model", str(tiny_sd15_dir), "--adapter", str(tmp_path / "tuned"), "--users",
                 str(users), "--prompts", "4", "--steps", "2", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert {"win_rate_vs_base", "adherence", "base_adherence", "per_user"} <= set(result)
    # The "tuned" UNet is the base one: same images, so every comparison is a tie.
    assert result["win_rate_vs_base"] == 0.5 and result["adherence"] == result["base_adherence"]
    assert main(["world", "eval", "--model", str(tiny_sd15_dir), "--adapter", str(tmp_path / "tuned")]) == 2
