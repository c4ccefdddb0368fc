#!/usr/bin/env bash
# GPU benchmarks of the training step (SD1.5 architecture, 512 px): LoRA and full fine-tuning, then UNet MFU.
# Self-contained: wheels in .whl/ (if any) are installed offline into /tmp/site, nothing is downloaded.
#   bash bench/gpu.sh            # from the repository root; JSON lines on stdout
# Not in this set (not yet run on a GPU): `--method ppd` (add `--config sd15 --method ppd --batch-pairs 8`) and
# personalized generation (`python bench/generate.py --json --device cuda`), see bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" > /dev/null; then
    pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

python -c "import torch; assert torch.cuda.is_available(), 'bench/gpu.sh needs a CUDA GPU'; print(torch.cuda.get_device_name(), file=__import__('sys').stderr)"

for rank in 8 0; do
    # Both variants are timed in one process (interleaved); if they do not fit on the card together,
    # time each in its own process instead.
    python bench/train_step.py --json --config sd15 --method dpo --lora-rank "$rank" --batch-pairs 8 \
        || python bench/train_step.py --json --config sd15 --method dpo --lora-rank "$rank" --batch-pairs 8 --sequential
done
python bench/train_step.py --json --flops --config sd15 --batch-pairs 8
