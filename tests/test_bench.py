"""The benchmark scripts run end to end at their smallest settings, and the generation speed-up they
measure (user K'/V' projected once per generation, user rows only) changes no output."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffpref.models.builders import tiny_sd15_pipeline
from diffpref.personalize.attention import (
    UserAttnProcessor,
    concat_user_tokens,
    fixed_user_tokens,
    install_user_attention,
    user_attention_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
K = 3  # user tokens
L = 6  # text tokens


def run_bench(script: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--json", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_positive_numbers(result: dict, keys: list[str]) -> None:
    for key in keys:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


def test_generate_bench_reports_throughput_overhead_and_embedding_time():
    result = run_bench("generate.py", "--device", "cpu", "--batch-size", "2", "--steps", "2", "--repeats", "5",
                       "--warmup", "1")
    keys = ["config", "batch_size", "steps", "base_images_per_s", "personalized_images_per_s", "overhead",
            "embed_user_k4_ms", "device"]
    assert set(keys) <= set(result)
    assert result["config"] == "embedded" and (result["batch_size"], result["steps"]) == (2, 2)
    assert result["device"].startswith("cpu")
    assert_positive_numbers(result, ["base_images_per_s", "personalized_images_per_s", "embed_user_k4_ms"])
    assert math.isfinite(result["overhead"])
    assert result["overhead"] == pytest.approx(result["base_images_per_s"] / result["personalized_images_per_s"] - 1,
                                               abs=2e-3)  # both rounded to 3 decimals
    assert len(result["base_batch_s"]) == len(result["personalized_batch_s"]) == 5


@pytest.mark.slow  # starts the embedded app twice
def test_app_bench_reports_start_latency_and_a_lossless_load_run():
    result = run_bench("app.py", "--ratings", "2", "--think", "0.5", "--clients", "3", "--per-client", "4",
                       "--fast-ratings", "3", "--fast-think", "0.2")
    assert result["start_s"] > 0 and result["rating_to_next_pair_ms"]["n"] == 2
    fast = result["fast_rater"]  # the fast-rater run's keys (its targets are measured on a quiet machine, not here)
    assert fast["rating_to_next_pair_ms"]["n"] == 3 and fast["first_pair_ms"] > 0 and fast["profile_ms"] > 0
    assert fast["rating_to_next_pair_ms"]["p50"] <= fast["rating_to_next_pair_ms"]["p95"] <= fast["rating_to_next_pair_ms"]["max"]
    assert 0 < result["rating_to_next_pair_ms"]["median"] <= result["rating_to_next_pair_ms"]["max"]
    load = result["load"]
    assert (load["stored"], load["expected"], load["error_count"]) == (12, 12, 0)
    assert load["people_with_wrong_ratings"] == [] and load["ratings_per_s"] > 0


@pytest.mark.slow  # ~25 s on an idle CPU: three processes (timing, and one memory child per variant)
def test_train_step_bench_runs_ppd():
    result = run_bench("train_step.py", "--device", "cpu", "--method", "ppd", "--batch-pairs", "1", "--repeats", "5",
                       "--warmup", "2")
    keys = ["config", "method", "pairs_per_s", "ref_pairs_per_s", "speedup", "peak_mem_mb", "ref_peak_mem_mb",
            "memory_ratio"]
    assert set(keys) <= set(result)
    assert (result["config"], result["method"], result["lora_rank"]) == ("embedded", "ppd", 0)
    assert_positive_numbers(result, keys[2:])
    # the two loops compute the same loss from the same user tokens (checked before timing)
    assert result["objective_abs_diff"] <= 1e-3 and result["user_tokens_abs_diff"] <= 1e-4


@pytest.mark.slow  # ~20 s: InPO's inversion is ten extra UNet passes in both loops
def test_train_step_bench_inpo_loops_compute_one_objective():
    """Both loops invert x0 with the same model (the trainer's default, the frozen reference), so the
    objective check holds; it failed while the reference-style loop still inverted with the policy."""
    result = run_bench("train_step.py", "--device", "cpu", "--method", "inpo", "--batch-pairs", "1", "--repeats", "5",
                       "--warmup", "2")
    assert (result["method"], result["lora_rank"]) == ("inpo", 8)
    assert result["objective_abs_diff"] <= 1e-3
    assert_positive_numbers(result, ["pairs_per_s", "ref_pairs_per_s", "speedup", "peak_mem_mb", "ref_peak_mem_mb"])


# ---------------------------------------------------------------------------------------------- fixed user


def _unet_and_inputs(batch_users: torch.Tensor):
    """The tiny SD1.5 UNet with user attention whose projections differ from to_k/to_v, and one call's inputs."""
    unet = tiny_sd15_pipeline(0).unet
    install_user_attention(unet, K)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in user_attention_parameters(unet):
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(0)
    batch = batch_users.shape[0]
    text = torch.randn(batch, L, 16, generator=g)
    mask = torch.ones(batch, L + K)
    mask[1, L - 1] = mask[2, L + 1] = 0  # a masked text token and a masked user token
    inputs = dict(sample=torch.randn(batch, 4, 16, 16, generator=g), timestep=torch.tensor(400),
                  encoder_hidden_states=concat_user_tokens(text, batch_users, K), encoder_attention_mask=mask)
    return unet, inputs


def _users(*rows):
    """[B, K, 16] user tokens: a row is None (no user: zeros) or a seed."""
    def one(seed):
        return torch.zeros(K, 16) if seed is None else torch.randn(K, 16, generator=torch.Generator().manual_seed(seed))

    return torch.stack([one(r) for r in rows])


@pytest.mark.parametrize("rows", [(None, None, 1, 2), (None, 1, None, 1), (1, 2, 3, 4), (None, None, None, None)])
def test_fixed_user_tokens_give_the_same_output_as_computing_every_call(rows):
    # (None, None, 1, 2) is the guidance layout [unconditional, conditional]; the others index rows or skip all
    unet, inputs = _unet_and_inputs(_users(*rows))
    projections = []
    for processor in unet.attn_processors.values():
        if isinstance(processor, UserAttnProcessor):
            original = processor._project_user
            processor._project_user = lambda *a, _f=original, **kw: projections.append(1) or _f(*a, **kw)
    with torch.no_grad():
        expected = unet(**inputs).sample
        calls_outside = len(projections)
        with fixed_user_tokens(unet):
            first, second = unet(**inputs).sample, unet(**inputs).sample
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)
    assert torch.equal(first, second)
    if any(r is not None for r in rows):  # projected once per layer for both calls, and only the user rows
        assert len(projections) - calls_outside == calls_outside
    no_user = [i for i, r in enumerate(rows) if r is None]
    assert torch.equal(first[no_user], expected[no_user])  # the zero user adds exactly nothing, skipped or not
    assert all(p._fixed is None for p in unet.attn_processors.values() if isinstance(p, UserAttnProcessor))


def test_fixed_user_tokens_notice_new_or_changed_tokens_and_stay_out_of_training():
    unet, inputs = _unet_and_inputs(_users(None, 1, None, 2))
    other = dict(inputs, encoder_hidden_states=concat_user_tokens(inputs["encoder_hidden_states"][:, :L],
                                                                  _users(None, 3, 4, None), K))
    with torch.no_grad():
        expected, expected_other = unet(**inputs).sample, unet(**other).sample
        with fixed_user_tokens(unet):
            torch.testing.assert_close(unet(**inputs).sample, expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(unet(**other).sample, expected_other, atol=1e-6, rtol=0)  # another tensor
            torch.testing.assert_close(unet(**inputs).sample, expected, atol=1e-6, rtol=0)
            inputs["encoder_hidden_states"][:, L:] = other["encoder_hidden_states"][:, L:]  # changed in place
            torch.testing.assert_close(unet(**inputs).sample, expected_other, atol=1e-6, rtol=0)
    with fixed_user_tokens(unet):  # gradients on: computed every call, as outside, so the projections train
        unet(**other).sample.square().mean().backward()
        assert all(p._fixed is None for p in unet.attn_processors.values() if isinstance(p, UserAttnProcessor))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in user_attention_parameters(unet))


def test_clip_attribute_probe_finds_the_background_linear_and_reports_every_attribute(tmp_path, capsys):
    """bench/clip_attribute_probe.py on world renders: the world CLIP sees backgrounds linearly."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffpref.world.detector import FEATURE_KEYS
    from diffpref.world.render import render, sample_attributes

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(240):
        buffer = io.BytesIO()
        render(sample_attributes(rng)).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    pq.write_table(pa.table({"jpg_0": blobs}), tmp_path / "pairs.parquet")
    spec = importlib.util.spec_from_file_location("clip_attribute_probe", ROOT / "bench" / "clip_attribute_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    result = probe.main(["--data", str(tmp_path / "pairs.parquet")])
    assert json.loads(capsys.readouterr().out) == result
    assert set(result["r2"]) == set(FEATURE_KEYS) and result["images"] == 240 and result["held_out"] == 60
    assert min(result["r2"][f"background:{b}"] for b in ("white", "black", "gray", "beige")) > 0.8


def test_attribute_response_examples_differ_only_in_the_probed_attribute():
    spec = importlib.util.spec_from_file_location("ppd_attribute_response", ROOT / "bench" / "ppd_attribute_response.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    from diffpref.world.detector import FEATURE_KEYS, detect_batch, feature_matrix

    rng = np.random.default_rng(0)
    for family, value in [("color", "green"), ("background", "black"), ("size", 0.1)]:
        examples = probe.clean_examples(family, value, 3, rng)
        good = feature_matrix(detect_batch(np.stack([np.asarray(e.preferred) for e in examples])))
        bad = feature_matrix(detect_batch(np.stack([np.asarray(e.rejected) for e in examples])))
        feature = FEATURE_KEYS.index(family if family == "size" else f"{family}:{value}")
        if family == "size":
            assert (good[:, feature] < bad[:, feature]).all()
        else:
            assert (good[:, feature] == 1).all() and (bad[:, feature] == 0).all()
        other = [i for i, k in enumerate(FEATURE_KEYS) if not k.startswith(family) and k not in ("size", "centered")]
        np.testing.assert_allclose(good[:, other], bad[:, other], atol=0.05)  # nothing else differs


@pytest.mark.slow
def test_attribute_response_bench_reports_base_and_tuned():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "ppd_attribute_response.py"), "--only", "size",
                           "--prompts", "3", "--shots", "2", "--steps", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [(r["attribute"], r["value"]) for r in rows] == [("size", 0.9), ("size", 0.1)]
    for r in rows:
        assert r["shift"] == pytest.approx(r["tuned"] - r["base"], abs=2e-3) and 0 <= r["base"] <= 1


def run_gpu_sh(budget_s: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_SH_BUDGET_S": str(budget_s)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=budget_s + 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-3000:]  # one JSON object, nothing else on stdout
    return json.loads(lines[0])


GPU_SH_STEPS = ("mfu_sd15", "sd15_dpo_lora", "ppd", "sdxl_dpo_lora", "fsdp", "zero3", "cache_build")
GPU_ONLY_STEPS = {"fsdp", "zero3"}  # skipped on the CPU, with the reason (FSDP: after checking launch and configs)


def test_gpu_sh_dry_run_assembles_one_json_within_its_budget():
    # A 1 s budget: the environment report runs, every step is refused for lack of time, and the script
    # still ends with its one JSON object (a GPU run cut short keeps its shape).
    result = run_gpu_sh(1)
    assert result["env"]["dry_run"] is True and result["env"]["torch"] == torch.__version__
    assert set(GPU_SH_STEPS) <= set(result) and result["budget_s"] == 1
    for name in GPU_SH_STEPS:
        assert "failed" in result[name] or "skipped" in result[name], (name, result[name])


@pytest.mark.slow  # every step of bench/gpu.sh at the embedded model's size on the CPU: minutes
def test_gpu_sh_dry_run_runs_every_step():
    result = run_gpu_sh(900)
    for name in GPU_SH_STEPS:
        rows = result[name] if isinstance(result[name], list) else [result[name]]
        assert rows and all("failed" not in row for row in rows), (name, result[name])
    assert result["mfu_sd15"]["gradient_checkpointing"] is True and result["mfu_sd15"]["flops_per_step"] > 0
    dpo = result["sd15_dpo_lora"]
    assert dpo["method"] == "dpo" and dpo["lora_rank"] == 8 and dpo["gradient_checkpointing"] is True
    assert dpo["pairs_per_s"] > 0 and dpo["ref_pairs_per_s"] > 0 and dpo["objective_abs_diff"] <= 1e-3
    assert result["ppd"]["method"] == "ppd" and result["ppd"]["pairs_per_s"] > 0
    # exactly the GPU-only steps are skipped, each saying why; the FSDP step checked what it would run
    assert {name for name in GPU_SH_STEPS if "skipped" in result[name]} == GPU_ONLY_STEPS
    assert "needs CUDA" in result["fsdp"]["skipped"] and "needs CUDA" in result["zero3"]["skipped"]
    launch = result["fsdp"]["fsdp_launch"]
    assert launch["problems"] == [] and launch["env"]["ACCELERATE_USE_FSDP"] == "true"
    assert launch["env"]["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    launch = result["zero3"]["zero3_launch"]  # what accelerate's launcher makes of zero3.yaml
    assert launch["problems"] == [] and launch["env"]["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    for engine in ("fsdp", "zero3"):
        assert set(result[engine]["runs"]) == {"dpo_lora", "dpo_lora_resume", "dpo_full", "ppd"}
        for command in result[engine]["runs"].values():
            assert command.startswith("accelerate launch --config_file ") and f"configs/accelerate/{engine}.yaml" in command


@pytest.mark.slow  # the full-size lane's code path at tiny shapes: five cases, each in its own process
def test_real_arch_lane_starts_every_objective_at_log2_and_exports_a_stock_loadable_lora():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "real_arch.py"), "--json", "--tiny", "--steps", "2",
                           "--cases", "sd15:dpo,sd15:inpo,sd15:ppd,sdxl:dpo,sdxl:ppd"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 5 and all("failed" not in row for row in rows), proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in rows:
        # every objective starts at the base model: the step-0 loss is log 2 in fp32, bit for bit
        assert row["loss_step0_is_log2"], (row["model"], row["method"], row["loss_step0"])
        assert row["recipe"] == f"configs/{row['model']}_{row['method']}.yaml"
        assert row["s_per_step"] > 0 and row["peak_rss_gb"] > 0
        if row["method"] == "ppd":
            assert row["conditioning"] == "ppd" and row["ppd_adapter_files"]
        else:
            # stock load_lora_weights gives back exactly the trained weights (in the UNet's dtype)
            assert row["stock_load_same_keys"] and row["stock_load_max_abs_diff"] == 0
