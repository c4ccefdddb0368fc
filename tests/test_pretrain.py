"""The embedded model's recipe: it runs end to end on a toy budget and resumes exactly after a crash."""

import pytest
import torch

from diffpref.experiments import pretrain
from diffpref.experiments.pretrain import PretrainConfig, lr_at, run

TOY = dict(num_images=48, vae_steps=2, vae_batch_size=4, unet_steps=4, unet_batch_size=4, clip_steps=2,
           clip_batch_size=8, checkpoint_every=2, warmup_steps=1, threads=1)


def _state(work):
    return torch.load(work / "unet_state.pt", map_location="cpu", weights_only=True)


def test_recipe_runs_and_exports_loadable_models(tmp_path):
    import open_clip
    from diffusers import StableDiffusionPipeline

    cfg = PretrainConfig(work_dir=str(tmp_path / "work"), out_dir=str(tmp_path / "out"), **TOY)
    run(cfg)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "out" / "world-sd")
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the cached latents
    image = pipe("a red star", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out' / 'world-clip'}")
    assert model.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 64)


def test_unet_phase_resumes_exactly_after_a_crash(tmp_path, monkeypatch):
    straight = PretrainConfig(work_dir=str(tmp_path / "a"), out_dir=str(tmp_path / "oa"), **TOY)
    run(straight, phases=("vae", "cache", "unet"))

    saves = {"n": 0}
    real_save = pretrain.Checkpointer.save

    def crash_after_first_unet_save(self, state):
        real_save(self, state)
        if self.path.name == "unet_state.pt":
            saves["n"] += 1
            if saves["n"] == 1:
                raise KeyboardInterrupt("simulated crash")

    crashed = PretrainConfig(work_dir=str(tmp_path / "b"), out_dir=str(tmp_path / "ob"), **TOY)
    monkeypatch.setattr(pretrain.Checkpointer, "save", crash_after_first_unet_save)
    with pytest.raises(KeyboardInterrupt):
        run(crashed, phases=("vae", "cache", "unet"))
    assert _state(tmp_path / "b")["step"] == 2
    run(crashed, phases=("vae", "cache", "unet"))

    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a["step"] == b["step"] == 4
    for key in ("unet", "ema_unet", "text_encoder"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(tensor, b[key][name], rtol=0, atol=0, msg=f"{key}.{name}")


def test_unknown_phase_is_refused(tmp_path):
    with pytest.raises(ValueError, match="valid phases"):
        run(PretrainConfig(work_dir=str(tmp_path)), phases=("vae", "train"))


def test_learning_rate_schedule():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
