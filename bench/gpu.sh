#!/usr/bin/env bash
# GPU benchmarks, SD1.5 architecture (random init, 512 px, bf16), batch 8 pairs, one JSON line each on stdout:
#   1. UNet forward+backward model FLOP utilisation, sdpa and xformers
#   2. personalized vs base generation (embedded model + adapter)
#   3. Diffusion-DPO training step, LoRA (rank 8) and full fine-tuning, against the reference-style loop
#   4. PPD training step (user encoder head + user projections), sdpa and xformers attention
#   5. SDXL architecture (1024 px), LoRA DPO, batch 2 pairs
# A step that fails prints {"failed": ..., "rc": ...} and the next one runs.
#   bash bench/gpu.sh > gpu.jsonl            # from the repository root
# Self-contained: wheels in .whl/ (diffusers, open_clip, xformers, ... if the machine lacks them) are installed
# offline into /tmp/site; nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

python3 - <<'EOF' || exit 1
import json, torch
assert torch.cuda.is_available(), "bench/gpu.sh needs a CUDA GPU"
try:
    import xformers
    xformers_version = xformers.__version__
except ImportError:
    xformers_version = None
import diffusers
from diffpref.models.loading import xformers_problem
print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "diffusers": diffusers.__version__, "xformers": xformers_version,
                  "xformers_problem": xformers_problem()}))
EOF

attention="sdpa"  # and xformers where its kernels really run (an import can succeed with no kernels)
python3 -c "from diffpref.models.loading import xformers_available as ok; raise SystemExit(not ok())" 2> /dev/null \
    && attention="sdpa xformers"

step() {  # step SECONDS COMMAND...: a hung or slow step cannot starve the ones after it
    local limit=$1
    shift
    timeout "$limit" "$@"
    local rc=$?
    [ $rc -eq 0 ] || echo "{\"failed\": \"$*\", \"rc\": $rc}"
}

step 120 python3 bench/train_step.py --json --flops --config sd15 --batch-pairs 8 --attention $attention
step 120 python3 bench/generate.py --json --device cuda --batch-size 16 --steps 20
step 300 python3 bench/train_step.py --json --config sd15 --method dpo --lora-rank 8 0 --batch-pairs 8
step 300 python3 bench/train_step.py --json --config sd15 --method ppd --batch-pairs 8 --attention $attention
step 300 python3 bench/train_step.py --json --config sdxl --method dpo --lora-rank 8 --batch-pairs 2
