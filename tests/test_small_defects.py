"""The small defects of issue 18, section 8, each with its test.

- PPD drops users with fewer than 2 base-image pairs with a counted skip instead of raising mid-run.
- ``load_pipeline`` (generation, evaluation, the app) never loads the SD1.5 safety checker, and says so.
- A ``--model`` that is neither a local folder nor reachable fails in one line naming what was looked for.
- ``report_to: tensorboard`` writes event files (tensorboard is a dependency), and ``eval_prompts: 0``
  turns world evaluation off instead of crashing. (history.jsonl growing per step: tests/test_trainer.py.)
- pyproject.toml's floors hold the APIs the code calls (the reasons are listed there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


# ----------------------------------------------------------------------------- PPD: users with < 2 pairs
def _bank():
    """Users 0 (3 pairs), 1 (1 pair), 2 (1 base pair + 1 on-policy pair, which is never context)."""
    from diffpref.personalize.context import ContextBank

    gen = torch.Generator().manual_seed(0)
    n, e = 6, 8
    return ContextBank(text=torch.randn(n, e, generator=gen), image_0=torch.randn(n, e, generator=gen),
                       image_1=torch.randn(n, e, generator=gen), label=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]),
                       user_index=torch.tensor([0, 0, 0, 1, 2, 2]),
                       context_ok=torch.tensor([True, True, True, True, True, False]))


def test_users_without_context_are_counted_not_fatal():
    bank = _bank()
    # user 1's pair and user 2's base pair have no other pair as context; user 2's on-policy pair does (row 4)
    assert (bank.dropped_users, bank.dropped_pairs) == (2, 2)
    assert bank.has_context(torch.arange(6)).tolist() == [True, True, True, False, False, True]
    assert bank.skip_message.startswith("PPD: dropped 2 of 3 users with fewer than 2 base-image pairs (2 of 6 pairs)")
    rows = torch.arange(6)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    features, mask = bank.sample_context(rows, gens, 1, 4)  # used to raise ValueError at row 3
    assert mask.any(1).all(), "every row needs one example slot for the encoder to run"
    assert mask[3:5].sum().item() == 2 and features[3:5].abs().sum() == 0  # one zero placeholder each
    assert mask[:3].sum(1).le(2).all()  # user 0's rows: at most their 2 other pairs
    assert torch.equal(features[5, 0], bank.features(torch.tensor([4]))[0])  # the on-policy pair reads row 4


def test_report_skips_says_it_once(caplog):
    from diffpref.personalize.context import report_skips

    lines: list[str] = []
    report_skips(_bank(), lines.append)
    assert len(lines) == 1 and "dropped 2 of 3 users" in lines[0]
    with caplog.at_level("WARNING"):
        report_skips(_bank())
    assert "dropped 2 of 3 users" in caplog.text


def test_conditioner_trains_dropped_users_without_a_user():
    """The conditioner zeroes the user tokens of rows without context, as user dropout does."""
    from diffpref.personalize.training import PPDConditioner

    class Encoder(torch.nn.Module):  # tokens = the mean of the examples + 1, so a kept user is never zero
        def forward(self, features, mask):
            mean = (features * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            return (mean[:, :4] + 1).unsqueeze(1).expand(-1, 2, -1)

    conditioner = PPDConditioner(SimpleNamespace(ppd_shots_min=1, ppd_shots_max=2, ppd_user_dropout=0.0))
    conditioner.bank, conditioner.encoder, conditioner.num_tokens = _bank(), Encoder(), 2
    prompt = torch.zeros(6, 3, 4)
    out = conditioner.condition(prompt, torch.arange(6), [torch.Generator().manual_seed(i) for i in range(6)])
    user = out[:, -2:]
    assert user[[0, 1, 2, 5]].abs().sum(dim=(1, 2)).gt(0).all() and user[3:5].abs().sum() == 0


# ----------------------------------------------------------------------------- safety checker off
def test_load_pipeline_drops_the_safety_checker(tmp_path, caplog):
    """A tiny SD1.5-style folder that ships a safety checker (as SD1.5 does): plain diffusers loads it,
    load_pipeline does not, and warns once that it is off."""
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    from diffpref.models.builders import tiny_sd15_pipeline
    from diffpref.models.loading import load_pipeline

    tiny = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config=dict(vocab_size=64, max_position_embeddings=16, **tiny),
        vision_config=dict(image_size=32, patch_size=16, **tiny), projection_dim=8))
    pipe = tiny_sd15_pipeline()
    pipe.register_modules(safety_checker=checker,
                          feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                               crop_size={"height": 32, "width": 32}))
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(tmp_path)
    assert DiffusionPipeline.from_pretrained(tmp_path).safety_checker is not None  # the fixture has a real one

    with caplog.at_level("WARNING", logger="diffpref.models.loading"):
        loaded = load_pipeline(tmp_path, device="cpu")
    assert loaded.safety_checker is None and not loaded.config.requires_safety_checker
    assert "safety checker" in caplog.text and "is off" in caplog.text
    image = loaded("a prompt", num_inference_steps=1, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_embedded_model_loads_without_a_warning(caplog):
    from diffpref.models.loading import load_pipeline

    with caplog.at_level("WARNING", logger="diffpref.models.loading"):
        pipe = load_pipeline("embedded", device="cpu")
    assert getattr(pipe, "safety_checker", None) is None and "safety checker" not in caplog.text


# ----------------------------------------------------------------------------- --model typo
@pytest.mark.parametrize("offline", ["1", "0"])
def test_model_typo_fails_in_one_line(tmp_path, offline):
    """`diffpref generate --model embeded` (a typo): one line naming what was looked for, no traceback,
    no hub retries. Offline (HF_HUB_OFFLINE=1) the hub is not asked; online a single request is made
    (here it fails at once: the test machine has no network, and the answer names the failure)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    env = {**os.environ, "HF_HUB_OFFLINE": offline, "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf")}  # an empty cache: nothing named 'embeded' can be found there
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "diffpref.cli", "generate", "--model", "embeded", "--prompts",
                          str(prompts), "--out", str(tmp_path / "out"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert "Traceback" not in run.stderr and len(lines) == 1, run.stderr
    assert "'embeded'" in lines[0] and "did you mean 'embedded'" in lines[0]
    assert str(Path(tmp_path / "embeded")) in lines[0]  # the local folder it looked for
    if offline == "1":
        assert "HF_HUB_OFFLINE" in lines[0]
    # No retry loop: what is left is Python's imports (diffusers) on a busy 2-core machine.
    assert elapsed < 120, f"took {elapsed:.0f} s"


# ----------------------------------------------------------------------------- tensorboard, eval_prompts=0
def red_over_blue_manifest(root: Path) -> Path:
    """8 pairs of world renders (the red one preferred), a JSONL manifest."""
    import numpy as np

    from diffpref.world.render import render, sample_attributes

    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        render(sample_attributes(rng, color="red")).save(root / f"{i}_a.png")
        render(sample_attributes(rng, color="blue")).save(root / f"{i}_b.png")
        lines.append({"prompt": "a shape", "image_0": f"{i}_a.png", "image_1": f"{i}_b.png", "label": 1.0})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_tensorboard_events_and_eval_prompts_zero(tmp_path, tiny_sd15_dir):
    """One run: `report_to: tensorboard` leaves event files holding the training loss, and `eval_world`
    with `eval_prompts: 0` trains with no evaluator (no crash, no evaluation rows)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffpref.launch import build_parts
    from diffpref.training.config import TrainConfig
    from diffpref.training.trainer import train

    data = tmp_path / "data"
    data.mkdir()
    users = data / "users.json"
    users.write_text((Path(__file__).resolve().parents[1] / "configs" / "users" / "red_large.json").read_text())
    cfg = TrainConfig(model=str(tiny_sd15_dir), data_path=str(red_over_blue_manifest(data)), output_dir=str(tmp_path / "out"),
                      max_train_steps=2, train_batch_size=2, lora_rank=4, checkpointing_steps=0, seed=0, threads=1,
                      cache_dir=str(tmp_path / "cache"), report_to="tensorboard", eval_world=True, eval_prompts=0,
                      eval_users=str(users))
    conditioner, evaluator = build_parts(cfg)
    assert evaluator is None
    train(cfg, conditioner, evaluator)
    events = sorted((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    assert events, "report_to=tensorboard wrote no event file"
    losses = {}
    for folder in {e.parent for e in events}:  # the scalars' file, plus one per hparams record
        acc = EventAccumulator(str(folder))
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            losses[folder] = [e.step for e in acc.Scalars("loss")]
    assert list(losses.values()) == [[1, 2]], f"the training loss is not in the event files: {losses}"
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2]
    assert not any(k.startswith("win_rate") for row in history for k in row)


# ----------------------------------------------------------------------------- dependency floors
def _floors() -> dict[str, str]:
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    out = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        lows = [spec.version for spec in req.specifier if spec.operator == ">="]
        if lows:
            out[req.name] = lows[0]
    return out


def test_installed_versions_meet_the_floors():
    from importlib.metadata import version

    from packaging.version import Version

    floors = _floors()
    for name in ("diffusers", "transformers", "peft", "huggingface-hub", "tensorboard", "accelerate"):
        assert name in floors, f"pyproject.toml has no floor for {name}"
        assert Version(version(name)) >= Version(floors[name]), f"{name} {version(name)} < floor {floors[name]}"
    # The floors named in pyproject.toml's comment, so that a lowered floor is a deliberate edit.
    assert Version(floors["diffusers"]) >= Version("0.40") and Version(floors["transformers"]) >= Version("4.56")
    assert Version(floors["peft"]) >= Version("0.17")


def test_the_apis_behind_the_floors(tiny_sd15_dir, tmp_path):
    """What the floors are for, on the installed versions: diffusers and transformers honour `dtype=`
    (older ones silently load fp32), and save_lora_weights takes unet_lora_adapter_metadata."""
    import inspect

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffpref.models.loading import load_pipeline

    pipe = load_pipeline(tiny_sd15_dir, device="cpu", dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert UNet2DConditionModel.from_pretrained(tiny_sd15_dir / "unet", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert CLIPTextModel.from_pretrained(tiny_sd15_dir / "text_encoder", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert "unet_lora_adapter_metadata" in inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters
