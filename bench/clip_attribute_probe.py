"""Diagnostic (not a benchmark): how linearly does the user encoder's backbone see each world attribute?

The ``evidence`` user encoder reads a user's taste as the mean, over their examples, of
phi(preferred) - phi(rejected) in the backbone's image space. That is a good taste estimate only
for attributes that phi carries linearly. This fits a ridge regression from the backbone's image
embedding to each detected attribute on 3/4 of the images of a ``make-data`` file and prints the
held-out R^2 per attribute as one JSON object:

    python bench/clip_attribute_probe.py --data data/world_ppd_p02/pairs.parquet
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a `diffpref world make-data` pairs.parquet")
    parser.add_argument("--backbone", default=None, help="open_clip local-dir folder (default: the embedded world CLIP)")
    parser.add_argument("--images", type=int, default=4096, help="how many image_0 images to use")
    parser.add_argument("--ridge", type=float, default=1e-3)
    args = parser.parse_args(argv)

    from diffpref.data.images import decode_image
    from diffpref.personalize.backbones import OpenClipBackbone
    from diffpref.world.detector import FEATURE_KEYS, detect_batch, feature_matrix

    column = pq.read_table(args.data, columns=["jpg_0"]).column("jpg_0").to_pylist()[:args.images]
    images = np.stack([decode_image(blob) for blob in column])
    targets = feature_matrix(detect_batch(images))
    backbone = OpenClipBackbone.from_pretrained(args.backbone, device="cpu")
    with torch.no_grad():
        embeddings = torch.cat([backbone.embed_images(list(images[i:i + 256])) for i in range(0, len(images), 256)])
    x = np.c_[embeddings.float().numpy(), np.ones(len(images))]
    n = len(x) * 3 // 4
    weights = np.linalg.solve(x[:n].T @ x[:n] + args.ridge * np.eye(x.shape[1]), x[:n].T @ targets[:n])
    residual = ((x[n:] @ weights - targets[n:]) ** 2).sum(0)
    total = ((targets[n:] - targets[n:].mean(0)) ** 2).sum(0)
    r2 = {key: round(float(1 - r / t), 3) if t > 0 else None for key, r, t in zip(FEATURE_KEYS, residual, total)}
    result = {"data": args.data, "images": len(images), "held_out": len(images) - n, "r2": r2}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
