"""A tiny CNN that names the shape of a world object from its (soft) mask.

The detector measures a per-pixel coverage map ("alpha", 1 inside the object, 0 on the
background, fractional on anti-aliased edges). The classifier sees that map cropped to a
square around the object's bounding box and resized to ``CROP_SIZE``, so it is invariant to
the object's size and position and only has to learn the outline.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffpref.world.render import SHAPES

CROP_SIZE = 32
# Empty pixels kept around the bounding box, so outlines never touch the crop's edge.
CROP_PAD = 1.0
WEIGHTS_PATH = Path(__file__).resolve().parent.parent / "assets" / "world" / "shape_classifier.safetensors"


class ShapeCNN(nn.Module):
    """Three conv blocks and a linear head: ~25k parameters, well under 1 MB on disk."""

    def __init__(self, n_classes: int = len(SHAPES), width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
        )
        self.head = nn.Linear(2 * width * 4 * 4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def crop_masks(alpha: np.ndarray | torch.Tensor, out_size: int = CROP_SIZE) -> torch.Tensor:
    """Crop each (H, W) coverage map to a square around its object; returns (N, 1, out, out).

    The square keeps the aspect ratio (a triangle is wider than tall; that is a cue). Crops
    are done for the whole batch at once with one ``grid_sample`` call.
    """
    a = torch.as_tensor(np.asarray(alpha, dtype=np.float32)) if isinstance(alpha, np.ndarray) else alpha.float()
    if a.ndim == 2:
        a = a[None]
    n, h, w = a.shape
    binary = a >= 0.5
    rows, cols = binary.any(dim=2), binary.any(dim=1)
    # First/last occupied row/column; images without object pixels get the full frame.
    idx_h = torch.arange(h, dtype=torch.float32)
    idx_w = torch.arange(w, dtype=torch.float32)
    big = float(max(h, w))
    y0 = torch.where(rows, idx_h, big).amin(dim=1)
    y1 = torch.where(rows, idx_h, -1.0).amax(dim=1) + 1.0
    x0 = torch.where(cols, idx_w, big).amin(dim=1)
    x1 = torch.where(cols, idx_w, -1.0).amax(dim=1) + 1.0
    empty = ~rows.any(dim=1)
    y0, x0 = torch.where(empty, 0.0, y0), torch.where(empty, 0.0, x0)
    y1, x1 = torch.where(empty, float(h), y1), torch.where(empty, float(w), x1)
    half = torch.maximum(y1 - y0, x1 - x0) / 2 + CROP_PAD
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    # Affine map from output coords in [-1, 1] to input coords (align_corners=False convention).
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 2 * half / w
    theta[:, 0, 2] = 2 * cx / w - 1
    theta[:, 1, 1] = 2 * half / h
    theta[:, 1, 2] = 2 * cy / h - 1
    grid = F.affine_grid(theta, [n, 1, out_size, out_size], align_corners=False)
    return F.grid_sample(a[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.lru_cache(maxsize=4)
def load_shape_classifier(path: str | None = None) -> ShapeCNN:
    """The shipped (or given) weights, loaded once per process and kept in eval mode."""
    from safetensors.torch import load_file

    weights = Path(path) if path is not None else WEIGHTS_PATH
    if not weights.exists():
        raise FileNotFoundError(
            f"shape classifier weights not found at {weights}; rebuild them with "
            "`python train/train_shape_classifier.py`"
        )
    model = ShapeCNN()
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    return model


@torch.no_grad()
def classify_shapes(alpha: np.ndarray, model: ShapeCNN | None = None, batch_size: int = 1024) -> np.ndarray:
    """Shape index (into SHAPES) for each (H, W) coverage map in ``alpha`` (N, H, W)."""
    model = model if model is not None else load_shape_classifier()
    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.ndim == 2:
        alpha = alpha[None]
    out = []
    for start in range(0, len(alpha), batch_size):
        out.append(model(crop_masks(alpha[start:start + batch_size])).argmax(dim=1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def make_training_set(n: int, seed: int, noise_fraction: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` random world images and turn them into (crops, shape labels).

    The masks come from the detector's own measurement code, so training and inference see
    the same inputs. A fraction of images gets mild pixel noise, so the classifier tolerates
    slightly imperfect (e.g. generated) images too.
    """
    from diffpref.world.detector import measure_objects  # local: the detector imports this module
    from diffpref.world.render import render_batch, sample_attributes

    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng) for _ in range(n)]
    images = render_batch(attrs).astype(np.float32)
    noisy = rng.random(n) < noise_fraction
    sigma = rng.uniform(1.0, 8.0, size=n)[:, None, None, None]
    images = np.where(noisy[:, None, None, None], images + rng.normal(size=images.shape) * sigma, images)
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    measured = measure_objects(images)
    keep = measured.found
    labels = torch.tensor([SHAPES.index(a.shape) for a in attrs])[torch.from_numpy(keep)]
    return crop_masks(measured.alpha[keep]), labels


def train_shape_classifier(
    steps: int = 1500,
    seed: int = 0,
    out_path: str | Path | None = WEIGHTS_PATH,
    n_images: int = 12000,
    batch_size: int = 128,
    lr: float = 3e-3,
    log_every: int = 250,
) -> ShapeCNN:
    """Train the CNN on fresh renders and save it as safetensors at ``out_path`` (None: don't save).

    Uses one CPU thread as a courtesy to other jobs; a couple of minutes at the defaults.
    """
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    t0 = time.time()
    x, y = make_training_set(n_images, seed)
    print(f"rendered {len(x)} training crops in {time.time() - t0:.1f}s", flush=True)
    model = ShapeCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        xb = x[idx]
        # Mirror left-right half the time: every shape is symmetric about the vertical axis.
        flip = torch.rand(batch_size, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_path))
        load_shape_classifier.cache_clear()  # later loads must see the new weights
        print(f"saved {out_path} ({out_path.stat().st_size / 1024:.0f} KiB)", flush=True)
    return model
