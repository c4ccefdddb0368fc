"""The trainer under FSDP through ``accelerate launch`` on one GPU: wrap, reference pass, save/resume, export.

    python bench/sharded_train.py --json              # GPU: SD1.5 architecture (random weights), FSDP, 1 process
    python bench/sharded_train.py --json --dry-run    # CPU: the same runs and checks on the embedded model, no FSDP

Every run is ``train/train.py`` started by the documented command, ``accelerate launch --config_file
configs/accelerate/fsdp.yaml --num_processes 1 train/train.py --config configs/sd15_<method>.yaml ...``
(one process on the one GPU: FULL_SHARD over one rank shards nothing, but the FSDP wrap of the UNet and
of PPD's user encoder, the reference pass through the prepared model, accelerate's sharded
``save_state`` / ``load_state`` and the export's ``summon_full_params`` gather all run). The shipped recipes
with the bench's overrides (256 px, batch 2, 8 pairs of random images, no evaluation); the first three
run side by side (the GPU holds all three), then the resume:

  dpo_lora         DPO, LoRA rank 8, 6 steps, a checkpoint at step 4: the exported LoRA loads with the stock
                   ``load_lora_weights`` (same tensors, trained: lora_B is no longer zero)
  dpo_lora_resume  a new run resumed from dpo_lora's step-4 checkpoint to step 6: its steps 5-6 and exported
                   LoRA against the uninterrupted run's (``resume_max_abs_diff``; 0 where the GPU is deterministic)
  dpo_full         DPO full fine-tuning, 2 steps (the frozen reference copy is prepared, i.e. FSDP-wrapped, too):
                   the exported UNet loads with ``from_pretrained`` and differs from the base
  ppd              PPD, 2 steps, both trainable parts (user encoder head + the UNet's user projections, which
                   start at zero): the adapter loads with ``load_ppd_adapter``; the projections have trained

``--dry-run``: accelerate 1.15 does not run FSDP on CPUs (docs/distributed.md), so the FSDP command is
built and resolved with accelerate's own launcher (the environment it gives the process: FSDP on,
the wrap policy, sharded state dicts) and the layer classes it wraps are checked to exist in the SD1.5
UNet; the four runs then go through one plain process each on the embedded model, with the same checks.
``--validate-only`` (what ``bench/gpu.sh --dry-run`` runs): the launch and the four runs' configs
(recipe + overrides, through ``load_config``) are checked, nothing trains; the JSON says the step is
skipped and why. ``--engine zero3``: the same four runs launched with ``configs/accelerate/zero3.yaml`` (DeepSpeed
ZeRO-3, one process; needs deepspeed, which gpu.sh installs from .whl/ where its wheels travel:
docs/distributed.md); with ``--validate-only`` the DeepSpeed launch and the configs are checked and the step is
skipped (accelerate 1.15 runs DeepSpeed on GPUs only). ``--dry-run`` ignores the engine.
One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
ZERO3_CONFIG = ROOT / "configs" / "accelerate" / "zero3.yaml"
ENGINES = {"fsdp": (FSDP_CONFIG, "FSDP"), "zero3": (ZERO3_CONFIG, "DEEPSPEED")}  # config, distributed_type it gives
ENGINE = "fsdp"  # set by main from --engine
TRAIN = ROOT / "train" / "train.py"
PAIRS = 8  # 4 users x 2 pairs: PPD has a context pair for every pair
STEPS, RESUME_AT = 6, 4
# The runs: (name, recipe, overrides); RESUME is replaced by dpo_lora's step-RESUME_AT checkpoint.
RESUME = "<dpo_lora checkpoint>"
RUNS = (
    ("dpo_lora", "sd15_dpo.yaml", ["lora_rank=8", f"max_train_steps={STEPS}", f"checkpointing_steps={RESUME_AT}"]),
    ("dpo_lora_resume", "sd15_dpo.yaml", ["lora_rank=8", f"max_train_steps={STEPS}", f"checkpointing_steps={RESUME_AT}",
                                          f"resume_from={RESUME}"]),
    ("dpo_full", "sd15_dpo.yaml", ["lora_rank=0", "max_train_steps=2", "checkpointing_steps=0"]),
    ("ppd", "sd15_ppd.yaml", ["ppd_backbone=embedded", "max_train_steps=2", "checkpointing_steps=0"]),
)
FSDP_SKIPPED = ("needs CUDA: FSDP does not run on CPU with torch 2.14.1 / accelerate 1.15 (docs/distributed.md); "
                "the launch and the runs' configs were checked")
ZERO3_SKIPPED = ("needs CUDA: accelerate 1.15 runs DeepSpeed on GPUs only (with cpu=True it never selects it; "
                 "without, processes on a CPU stay unjoined); the DeepSpeed launch and the runs' configs were checked. "
                 "On CPUs the trainer ran ZeRO-2/3 with 1 and 2 processes only through a patched accelerate "
                 "(docs/distributed.md)")
NO_DEEPSPEED = ("deepspeed is not installed: put its pure-python wheel and hjson, pydantic, pydantic-core, "
                "annotated-types, typing-inspection wheels in .whl/ (docs/distributed.md)")


STARTED: list[subprocess.Popen] = []  # ended with this process (gpu.sh's time limit stops it with SIGTERM)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group has ended already
        pass


def kill_started() -> None:
    for proc in STARTED:
        kill_group(proc)


def stop_started(*_) -> None:
    kill_started()
    raise SystemExit(143)


def launch_prefix(dry_run: bool, port: int = 29500) -> list[str]:
    """How each run is started: the engine's launch (GPU; runs side by side need their own rendezvous port),
    or one plain process (dry run)."""
    if dry_run:
        return [sys.executable, str(TRAIN)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ENGINES[ENGINE][0]),
            "--num_processes", "1", "--main_process_port", str(port), str(TRAIN)]


def resolve_fsdp_launch() -> dict:
    """What accelerate's launcher makes of the FSDP config (no GPU needed): the environment the training
    process gets, and whether the classes it wraps exist in the SD1.5 UNet (built on the meta device)."""
    from accelerate import init_empty_weights
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils import prepare_multi_gpu_env
    from train_step import build_unet

    command = launch_prefix(False)[3:] + ["--config", "configs/sd15_dpo.yaml"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(command))
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}
    with init_empty_weights():
        unet = build_unet("sd15")
    present = {type(m).__name__ for m in unet.modules()}
    wrapped = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",")
    problems = [f"{name} is not a module class of the SD1.5 UNet" for name in wrapped if name not in present]
    if env.get("ACCELERATE_USE_FSDP") != "true":
        problems.append("the launcher does not turn FSDP on")
    if env.get("FSDP_STATE_DICT_TYPE") != "SHARDED_STATE_DICT":
        problems.append("checkpoints are not sharded (docs/distributed.md assumes SHARDED_STATE_DICT)")
    return {"command": " ".join(["accelerate launch", *command]), "env": env, "wraps": wrapped,
            "problems": problems}


def resolve_zero3_launch() -> dict:
    """What accelerate's launcher makes of zero3.yaml (deepspeed need not be installed): the environment the
    training process gets."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    command = launch_prefix(False)[3:] + ["--config", "configs/sd15_dpo.yaml"]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(command))
    # as accelerate's launch_command does before its deepspeed_launcher
    args.deepspeed_fields_from_accelerate_config = ",".join(
        [*defaults.deepspeed_config] + (["mixed_precision"] if mp_from_config else []))
    _, env = prepare_deepspeed_cmd_env(args)
    env = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_",
                                                         "ACCELERATE_GRADIENT_", "ACCELERATE_MIXED"))}
    problems = []
    if env.get("ACCELERATE_USE_DEEPSPEED") != "true" or env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") != "3":
        problems.append("the launcher does not turn DeepSpeed ZeRO-3 on")
    if not env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1").isdigit():  # accelerate int()s it in Accelerator()
        problems.append("gradient_accumulation_steps in zero3.yaml is not an integer: Accelerator() fails on it")
    return {"command": " ".join(["accelerate launch", *command]), "env": env, "problems": problems}


def resolve_launch() -> dict:
    return resolve_fsdp_launch() if ENGINE == "fsdp" else resolve_zero3_launch()


def prepare(workdir: Path, dry_run: bool) -> tuple[str, Path, int]:
    """(model, pair manifest, resolution): the embedded model, or the SD1.5 architecture written to disk."""
    from train_step import build_components, make_pipeline, write_pairs

    resolution = 64 if dry_run else 256
    manifest, _ = write_pairs(workdir, PAIRS, resolution)
    if dry_run:
        return "embedded", manifest, resolution
    model = workdir / "sd15"
    make_pipeline("sd15", build_components("sd15", workdir)).save_pretrained(model)
    return str(model), manifest, resolution


def start(name: str, recipe: str, overrides: list[str], workdir: Path, dry_run: bool, port: int) -> dict:
    """Start one training run (its output in workdir/name, its log in workdir/name.log)."""
    out = workdir / name
    command = launch_prefix(dry_run, port) + ["--config", str(ROOT / "configs" / recipe), f"output_dir={out}",
                                              *overrides]
    log = workdir / f"{name}.log"
    with open(log, "w") as handle:
        # its own process group: killing the launcher would leave torchrun's worker running on the GPU
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    STARTED.append(proc)
    return {"name": name, "out": out, "log": log, "proc": proc, "started": time.perf_counter()}


def finish(run: dict, timeout: int) -> dict:
    """Wait for a run: its summary.json, history and how long it took (launch included); raises if it failed."""
    try:
        code = run["proc"].wait(timeout=max(1, timeout - (time.perf_counter() - run["started"])))
    except subprocess.TimeoutExpired:
        kill_group(run["proc"])
        code = "timeout"
    seconds = round(time.perf_counter() - run["started"], 1)
    text = run["log"].read_text(errors="replace")
    if code != 0:
        tail = [line for line in text.strip().splitlines() if line.strip()][-6:]
        raise RuntimeError(f"{run['name']}: exit {code} after {seconds} s: " + " | ".join(tail))
    summary = json.loads((run["out"] / "summary.json").read_text())
    history = [json.loads(line) for line in (run["out"] / "history.jsonl").read_text().splitlines()]
    return {**run, "seconds": seconds, "summary": summary, "history": history, "text": text}


def common_overrides(model: str, manifest: Path, workdir: Path, resolution: int, dry_run: bool) -> list[str]:
    out = [f"model={model}", f"data_path={manifest}", f"resolution={resolution}",
           "train_batch_size=2", "gradient_accumulation_steps=1", "report_to=none", "eval_prompts=0",
           "lr_warmup_steps=0", f"mixed_precision={'no' if dry_run else 'bf16'}"]
    return out + (["threads=1"] if dry_run else [])


def validate_runs() -> dict:
    """Each run's recipe with its overrides through ``load_config`` (unknown keys and bad values raise),
    and the full commands as the GPU runs them."""
    from diffpref.config import load_config
    from diffpref.training.config import TrainConfig

    workdir = Path("/tmp/sharded_train")
    commands = {}
    for name, recipe, overrides in RUNS:
        args = [f"output_dir={workdir / name}", f"cache_dir={workdir / 'cache'}"] + common_overrides(str(workdir / "sd15"), workdir / "pairs.jsonl", workdir,
                                                                  256, False) + overrides
        resume = [a for a in args if a.startswith("resume_from=")]
        checked = [a for a in args if a not in resume]  # the checkpoint exists only once dpo_lora ran
        cfg = load_config(TrainConfig, ROOT / "configs" / recipe, checked)
        if cfg.method not in ("dpo",) or (name == "ppd") != (cfg.conditioning == "ppd"):
            raise ValueError(f"{name}: {recipe} gives method {cfg.method}, conditioning {cfg.conditioning}")
        commands[name] = " ".join(["accelerate launch"] + launch_prefix(False)[3:]
                                  + ["--config", f"configs/{recipe}"] + args)
    return commands


def lora_check(model: str, out: Path) -> dict:
    """The exported LoRA through diffusers' stock loader: same tensors as the file, and trained."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from diffpref.models.loading import load_pipeline

    path = out / "pytorch_lora_weights.safetensors"
    saved = load_file(str(path))
    pipe = load_pipeline(model, device="cpu") if model == "embedded" else StableDiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(out), weight_name=path.name, adapter_name="bench")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="bench")
    b = [v for k, v in saved.items() if "lora_B" in k or "lora.up" in k]
    return {"tensors": len(saved), "stock_loaded_tensors": len(loaded),
            "finite": all(torch.isfinite(v).all().item() for v in saved.values()),
            "lora_B_max_abs": max(v.abs().max().item() for v in b) if b else None}


def base_unet(model: str):
    """The UNet the runs started from."""
    from diffusers import UNet2DConditionModel

    from diffpref.models.loading import load_pipeline

    if model == "embedded":
        return load_pipeline(model, device="cpu").unet
    return UNet2DConditionModel.from_pretrained(model, subfolder="unet")


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def run(args) -> dict:
    import torch
    from safetensors.torch import load_file

    from diffpref.training.checkpoint import checkpoints_root

    launch_key = f"{ENGINE}_launch"
    report: dict = {"dry_run": args.dry_run,
                    "engine": "none (one plain process)" if args.dry_run else ENGINES[ENGINE][1],
                    launch_key: resolve_launch()}
    if report[launch_key]["problems"]:
        report["failed"] = "; ".join(report[launch_key]["problems"])
        return report
    with tempfile.TemporaryDirectory(prefix="sharded_train_") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        model, manifest, resolution = prepare(workdir, args.dry_run)
        report["prepare_s"] = round(time.perf_counter() - started, 1)
        common = common_overrides(model, manifest, workdir, resolution, args.dry_run)
        recipes = {name: (recipe, overrides) for name, recipe, overrides in RUNS}
        runs: dict = {}

        def launch(name, cache, port, replace=None):
            recipe, overrides = recipes[name]
            overrides = [o.replace(RESUME, replace) for o in overrides] if replace else overrides
            return start(name, recipe, [*common, f"cache_dir={workdir / cache}", *overrides], workdir, args.dry_run,
                         port)

        def wait(handle):
            name = handle["name"]
            try:
                runs[name] = finish(handle, args.timeout)
                report[name] = {"seconds": runs[name]["seconds"],
                                "distributed_type": runs[name]["summary"]["distributed_type"],
                                "steps": runs[name]["summary"]["steps"],
                                "losses": [h["loss"] for h in runs[name]["history"]]}
            except (RuntimeError, OSError, ValueError, KeyError) as exc:  # reported; the other runs still run
                report[name] = {"failed": str(exc)[-1500:]}

        # dpo_lora, dpo_full and ppd side by side (one GPU holds all three; each its own cache), then the resume
        first = [launch("dpo_lora", "cache-dpo", 29501), launch("dpo_full", "cache-full", 29502),
                 launch("ppd", "cache-ppd", 29503)]
        for handle in first:
            wait(handle)
        if "dpo_lora" in runs:
            report["dpo_lora"].update(lora_check(model, runs["dpo_lora"]["out"]))
            checkpoint = checkpoints_root(runs["dpo_lora"]["out"]) / f"checkpoint-{RESUME_AT}"
            wait(launch("dpo_lora_resume", "cache-dpo", 29504, replace=str(checkpoint)))
            if "dpo_lora_resume" in runs:
                resumed, straight = runs["dpo_lora_resume"], runs["dpo_lora"]
                entry = report["dpo_lora_resume"]
                entry["history_steps"] = [h["step"] for h in resumed["history"]]
                entry["resumed_at"] = RESUME_AT if f"at step {RESUME_AT}" in resumed["text"] else None
                entry["loss_max_abs_diff"] = max(abs(a["loss"] - b["loss"]) for a, b in zip(
                    resumed["history"], straight["history"][RESUME_AT:]))
                entry["lora_max_abs_diff"] = max_abs_diff(
                    load_file(str(resumed["out"] / "pytorch_lora_weights.safetensors")),
                    load_file(str(straight["out"] / "pytorch_lora_weights.safetensors")))
        if "dpo_full" in runs:
            from diffusers import UNet2DConditionModel

            trained = UNet2DConditionModel.from_pretrained(runs["dpo_full"]["out"] / "unet")
            base_state = base_unet(model).state_dict()
            state = trained.state_dict()
            report["dpo_full"].update({
                "same_keys": state.keys() == base_state.keys(),
                "finite": all(torch.isfinite(v).all().item() for v in state.values()),
                "max_abs_change": max((state[k].float() - base_state[k].float()).abs().max().item() for k in state)})
        if "ppd" in runs:
            from diffpref.personalize.adapter import ATTENTION_NAME, load_ppd_adapter

            out = runs["ppd"]["out"]
            encoder, _ = load_ppd_adapter(base_unet(model), out)
            projections = load_file(str(out / ATTENTION_NAME))
            report["ppd"].update({
                "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
                "user_projection_tensors": len(projections),
                # the value projections start at zero (the base model at step 0): non-zero means they trained
                "user_values_max_abs": max((v.abs().max().item() for k, v in projections.items() if "to_v" in k),
                                           default=None),
                "finite": all(torch.isfinite(v).all().item() for v in projections.values())})
        report["problems"] = problems(report, "NO" if args.dry_run else ENGINES[ENGINE][1])
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def problems(report: dict, expected_type: str) -> list[str]:
    """What the runs got wrong ([] when every check holds)."""
    out = [f"{name}: {report[name]['failed']}" for name, _, _ in RUNS if "failed" in report.get(name, {})]
    ran = {name: report[name] for name, _, _ in RUNS if name in report and "failed" not in report[name]}
    out += [f"{name} ran as {r['distributed_type']}, not {expected_type}" for name, r in ran.items()
            if r["distributed_type"] != expected_type]
    if "dpo_lora" in ran:
        r = ran["dpo_lora"]
        if r["stock_loaded_tensors"] != r["tensors"] or not r["finite"] or not r["lora_B_max_abs"]:
            out.append("dpo_lora: the exported LoRA does not load with load_lora_weights as trained")
    if "dpo_lora_resume" in ran:
        r = ran["dpo_lora_resume"]
        if r["history_steps"] != list(range(RESUME_AT + 1, STEPS + 1)) or r["resumed_at"] != RESUME_AT:
            out.append(f"dpo_lora_resume did not continue from step {RESUME_AT}: {r['history_steps']}")
    if "dpo_full" in ran and not (ran["dpo_full"]["same_keys"] and ran["dpo_full"]["finite"]
                                  and ran["dpo_full"]["max_abs_change"] > 0):
        out.append("dpo_full: the exported UNet is not the trained base")
    if "ppd" in ran and not (ran["ppd"]["finite"] and ran["ppd"]["user_values_max_abs"]):
        out.append("ppd: the user value projections did not train")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU: embedded model, one plain process per run")
    p.add_argument("--validate-only", action="store_true", help="check the launch and the runs' configs; train nothing")
    p.add_argument("--engine", choices=("fsdp", "zero3"), default="fsdp")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--timeout", type=int, default=300, help="seconds per training run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop_started)
    global ENGINE
    ENGINE = args.engine
    if args.validate_only:
        launch = resolve_launch()
        skipped = FSDP_SKIPPED if ENGINE == "fsdp" else ZERO3_SKIPPED
        report = {"skipped": skipped, f"{ENGINE}_launch": launch, "runs": validate_runs()}
        if launch["problems"]:
            report = {"failed": "; ".join(launch["problems"]), **report}
        print(json.dumps(report) if args.json else report, flush=True)
        return 1 if launch["problems"] else 0
    if not args.dry_run:
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"bench/sharded_train.py runs {ENGINE} on a CUDA GPU; on a CPU use --dry-run")
        if ENGINE == "zero3" and importlib.util.find_spec("deepspeed") is None:
            print(json.dumps({"skipped": NO_DEEPSPEED}), flush=True)
            return 0
    try:
        report = run(args)
    finally:
        kill_started()
    print(json.dumps(report) if args.json else report, flush=True)
    return 1 if "failed" in report or report.get("problems") else 0


if __name__ == "__main__":
    raise SystemExit(main())
