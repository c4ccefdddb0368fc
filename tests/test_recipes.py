"""The shipped SD1.5/SDXL configs hold the numbers docs/recipes.md lists with their sources.

Each `## configs/<name>.yaml` (or `###`) section of docs/recipes.md has a table `| key | value | source |`.
Keys that are TrainConfig fields must equal what `load_config` reads from the YAML; the derived rows
(`gpus_assumed`, `effective_batch`, `lr_per_pair`) must agree with the config's batch arithmetic and with the
`# Effective batch:` line the config states. A changed number in either place fails here.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from diffpref.config import load_config
from diffpref.training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "recipes.md"
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("sd*_*.yaml"))
DERIVED = {"gpus_assumed", "effective_batch", "lr_per_pair"}
FIELDS = {f.name for f in fields(TrainConfig)}
EFFECTIVE_LINE = re.compile(r"^# Effective batch: (\d+) pairs? x (\d+) accumulation x (\d+) GPUs = (\d+) pairs", re.M)


def recipe_tables() -> dict[str, dict[str, tuple[str, str]]]:
    """{config file name: {key: (value, source)}} from the doc's per-config tables."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"^#{2,3} configs/(\S+\.yaml)\s*$", line)
        if heading:
            current = tables.setdefault(heading.group(1), {})
            continue
        if line.startswith("#"):
            current = None
        row = re.match(r"^\| `([a-z_0-9]+)` \| `([^`]*)` \| (.+) \|$", line)
        if current is not None and row:
            key, value, source = row.groups()
            assert key not in current, f"docs/recipes.md: {key} listed twice for one config"
            current[key] = (value, source.strip())
    return tables


TABLES = recipe_tables()


def _same(expected: str, actual) -> bool:
    if isinstance(actual, bool):
        return yaml.safe_load(expected) is actual
    if isinstance(actual, (int, float)):
        return float(expected) == pytest.approx(float(actual), rel=1e-12)
    return expected == str(actual)


def test_every_sd_config_has_a_table():
    assert set(CONFIGS) == set(TABLES), (
        f"configs without a table in docs/recipes.md: {sorted(set(CONFIGS) - set(TABLES))}; "
        f"tables without a config: {sorted(set(TABLES) - set(CONFIGS))}")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_matches_its_recipe_table(name):
    table = TABLES[name]
    cfg = load_config(TrainConfig, ROOT / "configs" / name)
    unknown = set(table) - FIELDS - DERIVED
    assert not unknown, f"docs/recipes.md {name}: keys that are no TrainConfig field: {sorted(unknown)}"
    for key, (value, source) in table.items():
        assert source, f"docs/recipes.md {name}: {key} has no source"
        if key in FIELDS:
            assert _same(value, getattr(cfg, key)), (
                f"{name}: {key} = {getattr(cfg, key)!r} but docs/recipes.md says {value} ({source})")
    # The numbers every recipe must state, each with a source.
    for key in ("learning_rate", "beta", "train_batch_size", "gradient_accumulation_steps", "gpus_assumed",
                "effective_batch", "max_train_steps", "optimizer", "weight_decay", "lr_warmup_steps",
                "lr_scheduler", "resolution", "mixed_precision"):
        assert key in table, f"docs/recipes.md {name}: no {key} row"


@pytest.mark.parametrize("name", CONFIGS)
def test_effective_batch_is_stated_and_adds_up(name):
    table = TABLES[name]
    cfg = load_config(TrainConfig, ROOT / "configs" / name)
    gpus, effective = int(table["gpus_assumed"][0]), int(table["effective_batch"][0])
    assert cfg.train_batch_size * cfg.gradient_accumulation_steps * gpus == effective
    stated = EFFECTIVE_LINE.findall((ROOT / "configs" / name).read_text())
    assert len(stated) == 1, f"{name} must state '# Effective batch: B pairs x A accumulation x N GPUs = E pairs' once"
    assert tuple(map(int, stated[0])) == (cfg.train_batch_size, cfg.gradient_accumulation_steps, gpus, effective)
    if "lr_per_pair" in table:  # the official --scale_lr rule: lr = per-pair lr x effective batch
        assert cfg.learning_rate == pytest.approx(float(table["lr_per_pair"][0]) * effective, rel=1e-12)


def test_paper_scale_learning_rates():
    """The defect issue 18 found: 2.048e-8 (the per-pair rate times 2.048) instead of 1e-8 x 2048."""
    lr = {name: load_config(TrainConfig, ROOT / "configs" / name).learning_rate for name in CONFIGS}
    assert lr["sd15_dpo.yaml"] == lr["sdxl_dpo.yaml"] == pytest.approx(2.048e-5)
    assert lr["sd15_inpo.yaml"] == lr["sdxl_inpo.yaml"] == pytest.approx(1.024e-5)


def test_sdxl_full_finetunes_use_adafactor():
    for name in ("sdxl_dpo.yaml", "sdxl_inpo.yaml"):
        assert load_config(TrainConfig, ROOT / "configs" / name).optimizer == "adafactor"


class _Cache:
    """What the trainer reads of a cache: items, their count, the empty prompt and the resolution."""

    resolution = 32

    def __init__(self, items: list[dict], dim: int):
        self.items = items
        self.empty_prompt_cond = {"prompt_embeds": torch.zeros(4, dim)}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_adafactor_trains_one_step():
    """`optimizer: adafactor` is transformers' Adafactor with the official SDXL settings (lr from the config
    and its schedule, no relative step, no parameter scaling, no warm-up init, clip threshold 1, the
    config's weight decay), and a full fine-tune takes a real optimizer step with it."""
    from accelerate import Accelerator
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers.optimization import Adafactor

    from diffpref.models.builders import WORLD_SCHEDULER_CONFIG, WORLD_UNET_CONFIG
    from diffpref.training.objectives import NoiseSchedule
    from diffpref.training.step import prepare_training, training_step

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**WORLD_UNET_CONFIG)
    dim = int(unet.config.cross_attention_dim)
    gen = torch.Generator().manual_seed(0)
    items = [{"latents_0": torch.randn(4, 8, 8, generator=gen), "latents_1": torch.randn(4, 8, 8, generator=gen),
              "label": 1.0, "prompt_embeds": torch.randn(4, dim, generator=gen)} for _ in range(4)]
    cfg = TrainConfig(method="dpo", data_path="unused", lora_rank=0, optimizer="adafactor", learning_rate=1e-3,
                      weight_decay=0.01, lr_warmup_steps=2, max_train_steps=2, train_batch_size=2, prompt_dropout=0.0,
                      report_to="none")
    schedule = NoiseSchedule(DDIMScheduler(**WORLD_SCHEDULER_CONFIG).alphas_cumprod.clone())
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    parts = prepare_training(cfg, Accelerator(cpu=True), unet, _Cache(items, dim), schedule)
    inner = getattr(parts.optimizer, "optimizer", parts.optimizer)  # accelerate wraps it
    assert isinstance(inner, Adafactor)
    group = inner.param_groups[0]
    assert (group["scale_parameter"], group["relative_step"], group["warmup_init"]) == (False, False, False)
    assert (group["clip_threshold"], group["weight_decay"]) == (1.0, 0.01)
    # step 0 of a 2-step warm-up runs at half the configured rate: the schedule drives Adafactor's lr
    assert group["lr"] == pytest.approx(5e-4)
    result = training_step(parts, 0)
    assert result.skipped == 0 and math.isfinite(result.metrics["loss"])
    assert group["lr"] == pytest.approx(1e-3)
    after = parts.raw_unet.state_dict()
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed > len(before) // 2, f"only {changed}/{len(before)} tensors moved in the Adafactor step"
