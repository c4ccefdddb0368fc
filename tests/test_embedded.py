"""The models shipped inside the package: stock loading, size, and the quality they promise."""

import numpy as np
import pytest
import torch

from diffpref.paths import embedded_clip_path, embedded_model_path


def _size_mb(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def test_shipped_models_fit_the_budget():
    sd, clip = _size_mb(embedded_model_path()), _size_mb(embedded_clip_path())
    assert sd > 1 and clip > 1, "the embedded models are missing: run train/pretrain_world.py"
    assert sd + clip <= 40, f"embedded models take {sd + clip:.1f} MB > 40 MB"


def test_stock_diffusers_loads_the_embedded_pipeline_offline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(embedded_model_path(), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red star on a white background", num_inference_steps=5, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_open_clip_loads_the_embedded_clip():
    import open_clip

    name = f"local-dir:{embedded_clip_path()}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a red star", "a blue circle"]))
    assert text.shape == (2, 64) and torch.isfinite(text).all()


@pytest.fixture(scope="module")
def adherence():
    """The issue's measurement: 240 generations of fully specified captions at 25 steps."""
    from diffpref.experiments.adherence import evaluate_adherence

    return evaluate_adherence("embedded", num_prompts=240, seed=0, steps=25, batch_size=120, progress=False)


@pytest.mark.slow
def test_embedded_model_follows_colour_and_shape(adherence):
    assert adherence["color_acc"] >= 0.95, adherence
    assert adherence["shape_acc"] >= 0.90, adherence


@pytest.mark.slow
def test_embedded_model_follows_background(adherence):
    assert adherence["background_acc"] >= 0.95, adherence


@pytest.mark.slow
def test_seeds_of_one_caption_differ_in_the_free_attributes():
    """Pairs carry preference signal only if two seeds of a caption differ in size, brightness, position."""
    from diffpref.generate import generate_images
    from diffpref.models.loading import load_pipeline
    from diffpref.world.detector import detect_batch

    pipe = load_pipeline("embedded", device="cpu")
    images = generate_images(pipe, ["a red star on a white background"] * 24, list(range(24)), steps=25)
    detections = [d for d in detect_batch(images) if d.found]
    assert len(detections) >= 20
    for attribute in ("size", "brightness", "centered"):
        values = np.array([getattr(d, attribute) for d in detections])
        assert values.std() > 0.08, (attribute, values.round(2))
