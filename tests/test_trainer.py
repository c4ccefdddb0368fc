"""The shared preference trainer on tiny random pipelines and a small manifest of world renders."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffpref.config import ConfigError, load_config
from diffpref.training import checkpoint as checkpoint_module
from diffpref.training.checkpoint import latest_checkpoint
from diffpref.training.config import TrainConfig
from diffpref.training.trainer import NonFiniteLossError, adapters_disabled, train
from diffpref.world.render import render, sample_attributes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """12 pairs of world renders: the preferred image is always the red one."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        good = render(sample_attributes(rng, color="red"))
        bad = render(sample_attributes(rng, color="blue"))
        good.save(root / f"{i}_a.png")
        bad.save(root / f"{i}_b.png")
        first_good = i % 2 == 0
        lines.append({"prompt": "a shape", "image_0": f"{i}_a.png" if first_good else f"{i}_b.png",
                      "image_1": f"{i}_b.png" if first_good else f"{i}_a.png", "label": 1.0 if first_good else 0.0,
                      "user_id": f"u{i % 3}"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _cfg(tmp_path, model_dir, manifest, **overrides):
    base = dict(model=str(model_dir), data_path=str(manifest), output_dir=str(tmp_path / "out"), max_train_steps=4,
                train_batch_size=4, learning_rate=1e-2, lora_rank=4, checkpointing_steps=2, report_to="none",
                cache_dir=str(tmp_path / "cache"), seed=0, inversion_steps=2, threads=1)
    base.update(overrides)
    return TrainConfig(**base)


def _lora_state(out_dir):
    return load_file(str(Path(out_dir) / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("method", ["dpo", "inpo", "kto", "mapo", "sft"])
def test_every_method_trains_and_exports_a_stock_loadable_lora(tmp_path, tiny_sd15_dir, manifest, method):
    from diffusers import StableDiffusionPipeline

    summary = train(_cfg(tmp_path, tiny_sd15_dir, manifest, method=method))
    assert summary["steps"] == 4 and np.isfinite(summary["final"]["loss"])
    if method == "inpo":  # x_t read from the inversion cache built before training: no inversion pass per step
        assert summary["extra_forward_passes"] == 0 and summary["inversion_build_s"] > 0
    # Stock diffusers loads exactly the weights training ended with (the final checkpoint holds them).
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.load_lora_weights(str(tmp_path / "out"))
    key = lambda name: re.sub(r"\.default(_0)?\.", ".", name)  # noqa: E731  (peft's adapter names differ)
    loaded = {key(n): p.detach() for n, p in pipe.unet.named_parameters() if "lora_" in n}
    trained = load_file(str(latest_checkpoint(tmp_path / "out") / "trainable.safetensors"))
    trained = {key(k.removeprefix("0.")): v for k, v in trained.items()}
    assert loaded.keys() == trained.keys() and any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    for name, value in loaded.items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)


def test_lora_changes_only_adapter_weights_and_keeps_alpha(tmp_path, tiny_sd15_dir, manifest):
    from safetensors import safe_open

    train(_cfg(tmp_path, tiny_sd15_dir, manifest, lora_rank=4, lora_alpha=2.0))
    state = _lora_state(tmp_path / "out")
    assert state and all("lora" in k for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k or "lora.up" in k)
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 2.0 and meta["unet.r"] == 4
    # Stock diffusers reads the alpha back: each LoRA layer scales by alpha / r = 0.5, not 1.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.load_lora_weights(str(tmp_path / "out"))
    scalings = {s for m in pipe.unet.modules() if hasattr(m, "lora_A") for s in m.scaling.values()}
    assert scalings == {0.5}
    assert not (tmp_path / "out" / "unet").exists()  # a LoRA run never writes a UNet copy


def test_full_finetune_saves_a_diffusers_unet(tmp_path, tiny_sd15_dir, manifest):
    from diffusers import UNet2DConditionModel

    train(_cfg(tmp_path, tiny_sd15_dir, manifest, lora_rank=0, learning_rate=1e-3))
    tuned = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sd15_dir / "unet")
    diffs = [(a - b).abs().max().item() for a, b in zip(tuned.parameters(), base.parameters())]
    assert max(diffs) > 0


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_resume_is_exact(tmp_path, tiny_sd15_dir, manifest, lora_rank):
    straight = _cfg(tmp_path / "a", tiny_sd15_dir, manifest, lora_rank=lora_rank, learning_rate=1e-3)
    train(straight)
    half = _cfg(tmp_path / "b", tiny_sd15_dir, manifest, lora_rank=lora_rank, learning_rate=1e-3, max_train_steps=2)
    train(half)
    resumed = _cfg(tmp_path / "b", tiny_sd15_dir, manifest, lora_rank=lora_rank, learning_rate=1e-3, resume_from="latest")
    summary = train(resumed)
    assert summary["steps"] == 4
    if lora_rank:
        a, b = _lora_state(tmp_path / "a" / "out"), _lora_state(tmp_path / "b" / "out")
    else:
        a = load_file(str(tmp_path / "a" / "out" / "unet" / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(tmp_path / "b" / "out" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_crash_during_save_keeps_latest_on_a_complete_checkpoint(tmp_path, tiny_sd15_dir, manifest, monkeypatch):
    real = checkpoint_module.os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):
        if str(src).endswith(".tmp") and "checkpoint-4" in str(src):
            raise OSError("disk full (simulated)")
        calls["n"] += 1
        return real(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated"):
        train(_cfg(tmp_path, tiny_sd15_dir, manifest))
    latest = latest_checkpoint(tmp_path / "out")
    assert latest is not None and latest.name == "checkpoint-2"
    assert json.loads((latest / "trainer_state.json").read_text())["global_step"] == 2


def test_non_finite_loss_stops_or_is_skipped(tmp_path, tiny_sd15_dir, manifest):
    # An absurd learning rate blows the weights up after the first step; every later loss is inf/NaN.
    with pytest.raises(NonFiniteLossError, match="nan_policy=skip"):
        train(_cfg(tmp_path / "a", tiny_sd15_dir, manifest, method="sft", learning_rate=1e30))
    summary = train(_cfg(tmp_path / "b", tiny_sd15_dir, manifest, method="sft", learning_rate=1e30, nan_policy="skip"))
    assert summary["steps"] == 4 and summary["skipped_steps"] == 3
    assert all(torch.isfinite(v).all() for v in _lora_state(tmp_path / "b" / "out").values())


def test_adapters_come_back_on_after_an_error_in_the_reference_pass(tiny_sd15_dir):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir / "unet")
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(RuntimeError):
        with adapters_disabled(unet):
            raise RuntimeError("boom")
    lora_layer = next(m for m in unet.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A"))
    assert not lora_layer.disable_adapters


def test_tiny_sdxl_dpo_step_runs(tmp_path, manifest):
    from diffpref.models.builders import tiny_sdxl_pipeline

    model_dir = tmp_path / "sdxl"
    tiny_sdxl_pipeline(seed=0).save_pretrained(model_dir)
    summary = train(_cfg(tmp_path, model_dir, manifest, max_train_steps=2, checkpointing_steps=0))
    assert summary["steps"] == 2 and np.isfinite(summary["final"]["loss"])


def test_timestep_range_limits_the_training_timesteps(tmp_path, tiny_sd15_dir, manifest, monkeypatch):
    from diffpref.training import randomness

    drawn = []
    original = randomness.per_sample_timesteps

    def recording(generators, high, low=0):
        t = original(generators, high, low)
        drawn.append(t)
        return t

    monkeypatch.setattr(randomness, "per_sample_timesteps", recording)
    train(_cfg(tmp_path / "a", tiny_sd15_dir, manifest, method="sft", timestep_min=900, timestep_max=950,
               checkpointing_steps=0))
    t = torch.cat(drawn)
    assert len(t) > 0 and int(t.min()) >= 900 and int(t.max()) < 950
    with pytest.raises(ValueError, match="timesteps \\[0, 5000\\) do not fit"):
        train(_cfg(tmp_path / "b", tiny_sd15_dir, manifest, method="sft", timestep_max=5000))
    with pytest.raises(ValueError, match="timestep_min"):
        _cfg(tmp_path / "c", tiny_sd15_dir, manifest, timestep_min=500, timestep_max=500)


def test_config_refuses_bad_keys_and_values(tmp_path, manifest):
    with pytest.raises(ConfigError, match="valid keys are:.*learning_rate"):
        load_config(TrainConfig, None, [f"data_path={manifest}", "learnin_rate=1"])
    with pytest.raises(ValueError, match="choose one of dpo, inpo, kto, mapo, sft"):
        load_config(TrainConfig, None, [f"data_path={manifest}", "method=ppo"])
    with pytest.raises(ValueError, match="data_path is empty"):
        TrainConfig()
    cfg = load_config(TrainConfig, REPO / "configs" / "embedded_dpo.yaml", ["max_train_steps=7", "beta=2500.5"])
    assert cfg.max_train_steps == 7 and cfg.beta == 2500.5 and isinstance(cfg.beta, float)
    for bad, message in (("ppd_shots_min=0", "ppd_shots_min"), ("ppd_value_init_scale=-1", "ppd_value_init_scale"),
                         ("ppd_attention_lr=-0.1", "ppd_attention_lr")):
        with pytest.raises(ValueError, match=message):
            load_config(TrainConfig, None, [f"data_path={manifest}", "method=ppd", bad])
    assert load_config(TrainConfig, None, [f"data_path={manifest}", "ppd_attention_lr=0.00005"]).ppd_attention_lr == 5e-5


@pytest.mark.parametrize("name", ["embedded_dpo", "embedded_inpo", "embedded_kto", "embedded_mapo", "embedded_ppd",
                                  "embedded_ppd_online", "sd15_dpo", "sd15_inpo", "sdxl_dpo", "sdxl_inpo", "sd15_ppd", "sdxl_ppd"])
def test_shipped_configs_parse(name):
    cfg = load_config(TrainConfig, REPO / "configs" / f"{name}.yaml")
    # PPD configs are `method: dpo` plus a `ppd:` section (conditioning: ppd)
    assert cfg.method in name or (cfg.method == "dpo" and cfg.conditioning == "ppd" and name.endswith(("_ppd", "_ppd_online")))


@pytest.mark.slow
def test_two_processes_give_the_same_loss_curve_as_one(tmp_path, tiny_sd15_dir, manifest):
    """torchrun (gloo, CPU): 2 processes x 2 pairs == 1 process x 4 pairs, step for step."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [f"model={tiny_sd15_dir}", f"data_path={manifest}", "max_train_steps=3", "report_to=none",
              f"cache_dir={tmp_path / 'cache'}", "learning_rate=1e-2", "lora_rank=4", "checkpointing_steps=0", "threads=1",
              "lr_warmup_steps=0", "eval_world=false"]
    script = str(REPO / "train" / "train.py")
    config = str(REPO / "configs" / "embedded_dpo.yaml")
    subprocess.run([sys.executable, script, "--config", config, *common, f"output_dir={tmp_path / 'one'}",
                    "train_batch_size=4", "eval_every=0"], check=True, env=env, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    script, "--config", config, *common, f"output_dir={tmp_path / 'two'}", "train_batch_size=2",
                    "eval_every=0"], check=True, env=env, cwd=tmp_path)
    def curve(d):
        rows = [json.loads(line) for line in (tmp_path / d / "history.jsonl").read_text().splitlines()]
        return np.array([[r["loss"], r["implicit_acc"]] for r in rows])

    one, two = curve("one"), curve("two")
    assert one.shape == two.shape == (3, 2)
    # Equal up to float reduction order (all-reduce vs one batch mean); beta * (float noise of the
    # errors) moves the loss by ~1e-4 relative, a different batch or noise by ~1e-2.
    np.testing.assert_allclose(one, two, rtol=5e-4, atol=0)
    # The tolerance still separates a different data order/noise stream: another seed fails it.
    subprocess.run([sys.executable, script, "--config", config, *common, f"output_dir={tmp_path / 'other'}",
                    "train_batch_size=4", "eval_every=0", "seed=1"], check=True, env=env, cwd=tmp_path)
    assert not np.allclose(one, curve("other"), rtol=5e-4, atol=0)


class _TokenConditioner:
    """A toy conditioner: one learned token appended to the prompt; the reference drops it."""

    def __init__(self):
        self.calls = []

    def setup(self, cfg, unet, cache, accelerator, tokenizer):
        dim = int(unet.config.cross_attention_dim)
        self.token = torch.nn.Linear(1, dim, bias=False)  # its weight is the token
        torch.nn.init.normal_(self.token.weight, std=0.1)
        self.initial = self.token.weight.detach().clone()
        self.frozen_unet = not any(p.requires_grad for p in unet.parameters())
        self.calls.append("setup")
        return [{"params": list(self.token.parameters()), "lr": 0.05, "name": "token"}]

    @property
    def modules(self):
        return [self.token]

    def bind(self, modules):
        (self.token,) = modules
        self.calls.append("bind")

    def condition(self, prompt_embeds, indices, generators):
        token = self.token.weight.T.unsqueeze(0).expand(prompt_embeds.shape[0], 1, -1)
        return torch.cat([prompt_embeds, token.to(prompt_embeds.dtype)], dim=1)

    def without_user(self, prompt_embeds):
        return prompt_embeds[:, :-1]

    def export(self, unet, output_dir):
        self.calls.append("export")
        path = Path(output_dir) / "token.pt"
        torch.save(self.token.weight.detach(), path)
        return path


class _HistoryReader:
    """A toy evaluator that reads history.jsonl when called: the steps before it must be on disk."""

    def __init__(self, out_dir):
        self.out_dir, self.seen, self.attached = Path(out_dir), {}, []

    def attach(self, unet, pipeline_class, resolution):
        self.attached.append((type(unet).__name__, pipeline_class.__name__, resolution))

    def __call__(self, step):
        lines = (self.out_dir / "history.jsonl").read_text().splitlines()
        self.seen[step] = [json.loads(line)["step"] for line in lines]
        return {"toy_metric": float(step)}


def test_conditioner_and_evaluator_are_called_as_the_protocol_says(tmp_path, tiny_sd15_dir, manifest):
    conditioner, evaluator = _TokenConditioner(), _HistoryReader(tmp_path / "out")
    summary = train(_cfg(tmp_path, tiny_sd15_dir, manifest, lora_rank=0, eval_every=2), conditioner, evaluator)
    assert conditioner.calls == ["setup", "bind", "export"] and conditioner.frozen_unet
    moved = (conditioner.token.weight.detach().cpu() - conditioner.initial).abs().max()
    assert moved > 1e-3  # the conditioner's own module trained at its own learning rate
    assert not (tmp_path / "out" / "unet").exists() and (tmp_path / "out" / "token.pt").exists()
    assert evaluator.attached == [("UNet2DConditionModel", "StableDiffusionPipeline", 32)]
    # history.jsonl grows as training goes: at step 2 (eval_every) it already holds steps 1 and 2 (this
    # step's line is written after its evaluation); the final call sees all 4
    assert evaluator.seen == {2: [1], 4: [1, 2, 3, 4]}
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and history[1]["toy_metric"] == 2.0
    assert all(h["token_lr"] == 0.05 for h in history) and summary["eval"] == {"toy_metric": 4.0}


def test_resumed_run_rewrites_history_from_its_checkpoint(tmp_path, tiny_sd15_dir, manifest):
    train(_cfg(tmp_path, tiny_sd15_dir, manifest, max_train_steps=3, checkpointing_steps=2))
    # as if it had crashed after logging step 3 but before saving it: resumed from step 2, it trains step 3 again
    summary = train(_cfg(tmp_path, tiny_sd15_dir, manifest, max_train_steps=4, checkpointing_steps=2,
                         resume_from=str(tmp_path / "out" / "checkpoints" / "checkpoint-2")))
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and summary["steps"] == 4


def test_a_conditioning_config_without_its_conditioner_is_refused(tmp_path, tiny_sd15_dir, manifest):
    with pytest.raises(ValueError, match="build_parts"):
        train(_cfg(tmp_path, tiny_sd15_dir, manifest, conditioning="ppd", lora_rank=0))


def test_build_parts_evaluates_on_world_data_only_when_asked(tmp_path, manifest):
    from diffpref.launch import build_parts

    cfg = lambda **kw: TrainConfig(data_path=str(manifest), **kw)
    assert build_parts(cfg()) == (None, None)  # no users.json beside the data, and eval_world is off
    with pytest.raises(FileNotFoundError, match="users.json"):
        build_parts(cfg(eval_world=True))
    users = tmp_path / "users.json"
    users.write_text((REPO / "configs" / "users" / "red_large.json").read_text())
    assert build_parts(cfg(eval_world=True, eval_users=str(users), eval_prompts=0)) == (None, None)
    conditioner, evaluator = build_parts(cfg(eval_world=True, eval_users=str(users), eval_prompts=3))
    assert conditioner is None and (len(evaluator.prompts), len(evaluator.users)) == (3, 1)
    with pytest.raises(ValueError, match="without a user"):  # a PPD run is judged per user, not by this
        build_parts(cfg(conditioning="ppd", lora_rank=0, eval_world=True, eval_users=str(users)))


def test_a_registered_objective_trains_through_train(tmp_path, tiny_sd15_dir, manifest):
    """The recipe of diffpref.training.objectives' docstring: one function and one register_objective call."""
    from diffpref.training.objectives import (
        OBJECTIVES,
        ObjectiveOutput,
        preferred,
        register_objective,
    )

    seen = []

    def quiet(x):  # a toy objective: the policy's output on the preferred images, pushed toward zero
        seen.append((x.reference, x.beta))
        winner = preferred(x.batch)
        out = x.policy(x.schedule.add_noise(winner, x.noise, x.t), x.t, x.batch["cond"])
        loss = out.pow(2).mean(dim=(1, 2, 3))
        return ObjectiveOutput(loss, {"output_power": float(loss.detach().mean())})

    register_objective("quiet", quiet, default_beta=3.0, data="pairs", uses_reference=False)
    try:
        summary = train(_cfg(tmp_path, tiny_sd15_dir, manifest, method="quiet", max_train_steps=6, train_batch_size=12,
                             checkpointing_steps=0))
    finally:
        del OBJECTIVES["quiet"]
    power = [json.loads(line)["output_power"] for line in (tmp_path / "out" / "history.jsonl").read_text().splitlines()]
    assert summary["steps"] == 6 and power[-1] < 0.7 * power[0]  # trained: its loss fell (measured: to 0.49x)
    assert set(seen) == {(None, 3.0)}  # no reference pass for it, and its default beta
    with pytest.raises(ValueError, match="choose one of dpo, inpo, kto, mapo, sft"):
        TrainConfig(method="quiet", data_path=str(manifest))  # gone from the registry, gone from the config
