"""Build the embedded world model (VAE, text encoder, UNet, tiny CLIP) from nothing; resumable.

    python train/pretrain_world.py --config configs/pretrain_world.yaml [key=value ...] [--phases vae,cache,unet,clip,export]
"""

import argparse

from diffpref.config import load_config
from diffpref.experiments.pretrain import PHASES, PretrainConfig, run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain_world.yaml")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    run(cfg, tuple(p for p in args.phases.split(",") if p))


if __name__ == "__main__":
    main()
