"""Rebuild the shipped shape-classifier weights (diffpref/assets/world/shape_classifier.safetensors).

    python train/train_shape_classifier.py [--steps 1500] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse

from diffpref.world.shape_classifier import WEIGHTS_PATH, train_shape_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-images", type=int, default=12000)
    parser.add_argument("--out", default=str(WEIGHTS_PATH))
    args = parser.parse_args()
    train_shape_classifier(steps=args.steps, seed=args.seed, out_path=args.out, n_images=args.n_images)


if __name__ == "__main__":
    main()
