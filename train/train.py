"""Preference fine-tuning entry point (DPO, InPO, KTO, MaPO, SFT; PPD), one process or many.

    accelerate launch train/train.py --config configs/embedded_dpo.yaml [key=value ...]
    torchrun --nproc_per_node 2 train/train.py --config ...      # CPU multi-process (gloo)
"""

import argparse

from diffpref.config import load_config
from diffpref.launch import build_parts
from diffpref.training.config import TrainConfig
from diffpref.training.trainer import train


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_train_steps=50 beta=2000")
    args = parser.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    train(cfg, *build_parts(cfg))  # the conditioner (conditioning: ppd) and the evaluator (eval_world: true)


if __name__ == "__main__":
    main()
