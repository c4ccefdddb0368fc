#!/usr/bin/env bash
# GPU benchmarks in one go: one JSON object on stdout, within a total time budget (default 480 s).
#   bash bench/gpu.sh > gpu.json              # on a GPU machine, from anywhere
#   bash bench/gpu.sh --dry-run               # the same steps on a CPU at the embedded model's size (tests)
#
# Measured (random-init weights of the real architectures: bench/train_step.py writes out their configs):
#   mfu_sd15        SD1.5 UNet forward+backward, bf16, batch 8 pairs (16 images), 512 px, gradient
#                   checkpointing: model FLOPs (counted without the recompute) / time / the card's bf16 peak;
#                   sdpa, and xformers where its kernels really run
#   sd15_dpo_lora   Diffusion-DPO LoRA (rank 8) step, bf16, batch 8 pairs, 512 px, gradient checkpointing:
#                   the trainer's prepare_training + training_step (models through accelerate.prepare) vs the
#                   reference-style loop (pairs/s, speed-up, peak GPU memory of each, in its own process)
#   ppd             PPD step (user encoder head + user projections), batch 8 pairs, 512 px, sdpa and xformers
#   sdxl_dpo_lora   SDXL LoRA DPO step at 1024 px, batch 2 pairs, gradient checkpointing
#   fsdp            the trainer under `accelerate launch --config_file configs/accelerate/fsdp.yaml` (1 process):
#                   SD1.5 architecture, DPO LoRA (checkpoint + a resumed run compared with the uninterrupted one),
#                   DPO full fine-tuning, PPD (both trainable parts); the exported weights loaded back
#                   (bench/sharded_train.py). --dry-run: skipped (FSDP needs CUDA), the launch and configs checked
#   zero3           the same four runs under `accelerate launch --config_file configs/accelerate/zero3.yaml` (DeepSpeed
#                   ZeRO-3, 1 process; bench/sharded_train.py --engine zero3). Needs deepspeed: its pure-python wheel
#                   (DS_BUILD_OPS=0 pip wheel, docs/distributed.md) and hjson, pydantic, pydantic-core, annotated-types,
#                   typing-inspection wheels in .whl/ (the image has the other needs); without them the step says
#                   so and is skipped. --dry-run: skipped (DeepSpeed needs CUDA), the launch and configs checked
#   cache_build     preference-cache build rate (bench/cache_build.py, when present)
# Time (estimated, not yet run on a GPU): the steps' limits below add up to more than the budget; the budget
# guard refuses or cuts whatever would end past it, so the last steps (zero3, cache_build) are the ones that give
# way (GPU_SH_BUDGET_S=900 gives every step its limit).
#
# Offline and self-contained: the machine needs python3 + torch (CUDA); everything else (diffusers,
# transformers, accelerate, peft, open_clip, xformers, ...) comes from wheels in .whl/ that travel with the
# tree, installed with --no-index into /tmp/site; the project itself is used from the tree (PYTHONPATH).
# A step that fails or runs out of its time gives {"failed": ..., "rc": ...} in its place, and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
BUDGET=${GPU_SH_BUDGET_S:-480}
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        *) echo "usage: bash bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
    esac
done
START=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >&2 || { echo '{"failed": "pip install .whl/*.whl"}'; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

if [ $DRY_RUN = 1 ]; then
    # the embedded model on the CPU: every step's code path and the JSON assembly, in seconds
    DEV=(--device cpu)
    SD15=(--config embedded --batch-pairs 1)
    SDXL=(--config embedded --batch-pairs 1)
    ATTENTION="sdpa"
    LIMIT_MFU=120 LIMIT_DPO=180 LIMIT_PPD=180 LIMIT_SDXL=180 LIMIT_CACHE=120 LIMIT_FSDP=120 LIMIT_ZERO3=60
    FSDP=(--validate-only)  # FSDP and DeepSpeed need CUDA: the launch and the runs' configs are checked, nothing trains
    ZERO3=(--validate-only)
else
    DEV=()
    SD15=(--config sd15 --batch-pairs 8)
    SDXL=(--config sdxl --batch-pairs 2)
    ATTENTION="sdpa"  # and xformers where its kernels really run (an import can succeed with no kernels)
    python3 -c "from diffpref.models.loading import xformers_available as ok; raise SystemExit(not ok())" 2> /dev/null \
        && ATTENTION="sdpa xformers"
    LIMIT_MFU=50 LIMIT_DPO=100 LIMIT_PPD=100 LIMIT_SDXL=110 LIMIT_CACHE=45 LIMIT_FSDP=150 LIMIT_ZERO3=150
    FSDP=(--timeout 120)
    ZERO3=(--timeout 120)
fi

python3 - "$DRY_RUN" > "$WORK/env.jsonl" 2> "$WORK/env.err" <<'EOF'
import json, sys
import torch
dry = sys.argv[1] == "1"
if not dry and not torch.cuda.is_available():
    raise SystemExit("bench/gpu.sh needs a CUDA GPU (or --dry-run)")
try:
    import xformers
    xformers_version = xformers.__version__
except ImportError:
    xformers_version = None
import accelerate, diffusers, peft, transformers
from diffpref.models.loading import xformers_problem
print(json.dumps({"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "dry_run": dry,
                  "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                  "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                  "peft": peft.__version__, "xformers": xformers_version,
                  "xformers_problem": None if dry else xformers_problem()}))
EOF
[ $? -eq 0 ] || { python3 -c 'import json,sys; print(json.dumps({"failed": "environment", "error": sys.argv[1]}))' \
    "$(tail -3 "$WORK/env.err")"; exit 1; }

step() {  # step NAME SECONDS COMMAND...: its JSON lines go to $WORK/NAME.jsonl; never past the budget
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START) - 5))
    [ $left -lt $limit ] && limit=$left
    if [ $limit -le 0 ]; then
        echo "{\"failed\": \"no time left in the ${BUDGET} s budget\", \"rc\": null}" > "$WORK/$name.jsonl"
        return
    fi
    timeout "$limit" "$@" > "$WORK/$name.jsonl" 2> "$WORK/$name.err"
    local rc=$?
    if [ $rc -ne 0 ]; then
        python3 -c 'import json,sys; print(json.dumps({"failed": sys.argv[1], "rc": int(sys.argv[2]), "limit_s": int(sys.argv[3]), "stderr": sys.argv[4]}))' \
            "$*" "$rc" "$limit" "$(tail -c 1500 "$WORK/$name.err")" >> "$WORK/$name.jsonl"
    fi
}

TS=(python3 bench/train_step.py --json --gradient-checkpointing "${DEV[@]}")
step mfu_sd15 $LIMIT_MFU "${TS[@]}" --flops "${SD15[@]}" --attention $ATTENTION
step sd15_dpo_lora $LIMIT_DPO "${TS[@]}" "${SD15[@]}" --method dpo --lora-rank 8
step ppd $LIMIT_PPD "${TS[@]}" "${SD15[@]}" --method ppd --attention $ATTENTION
step sdxl_dpo_lora $LIMIT_SDXL "${TS[@]}" "${SDXL[@]}" --method dpo --lora-rank 8
step fsdp $LIMIT_FSDP python3 bench/sharded_train.py --json "${FSDP[@]}"
step zero3 $LIMIT_ZERO3 python3 bench/sharded_train.py --json --engine zero3 "${ZERO3[@]}"
if [ -f bench/cache_build.py ]; then
    CB=(python3 bench/cache_build.py --json --processes 1)  # one GPU: one process
    if [ $DRY_RUN = 1 ]; then CB+=(--pairs 16); else CB+=(--pairs 1024); fi
    step cache_build $LIMIT_CACHE "${CB[@]}"
else
    echo '{"skipped": "bench/cache_build.py is not in this tree"}' > "$WORK/cache_build.jsonl"
fi

python3 - "$WORK" "$START" "$BUDGET" <<'EOF'
import json, sys, time
from pathlib import Path
work, start, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def lines(name):
    out = []
    for line in (work / f"{name}.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a library's stray print on stdout
    return out
report = {"env": lines("env")[0]}
for name in ("mfu_sd15", "sd15_dpo_lora", "ppd", "sdxl_dpo_lora", "fsdp", "zero3", "cache_build"):
    rows = lines(name)
    report[name] = rows[0] if len(rows) == 1 else rows
report["wall_s"] = int(time.time()) - start
report["budget_s"] = budget
print(json.dumps(report))
EOF
