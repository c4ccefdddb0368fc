
import numpy as np
import pytest
import torch

from diffpref.config import ConfigError, load_config
from diffpref.models.builders import tiny_sd15_pipeline, tiny_sdxl_pipeline
from diffpref.models.loading import check_attention, load_pipeline, native_resolution, resolve_model
from diffpref.models.tokenizer import build_vocabulary, load_world_tokenizer, write_world_tokenizer
from diffpref.world.captions import caption_vocabulary
from diffpref.experiments.pretrain import PretrainConfig


def test_world_words_are_single_tokens(tmp_path):
    tok = load_world_tokenizer(write_world_tokenizer(tmp_path))
    for word in caption_vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
    # Unknown words still tokenize (into pieces) instead of failing.
    assert len(tok("zebra", add_special_tokens=False).input_ids) > 1
    ids = tok("a red star", padding="max_length", max_length=tok.model_max_length).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == tok.model_max_length


def test_vocabulary_merges_do_not_break_earlier_words():
    vocab, merges = build_vocabulary(["red", "green", "re", "reed"])
    assert {"red</w>", "green</w>", "re</w>", "reed</w>"} <= set(vocab)
    assert len(set(merges)) == len(merges)


@pytest.mark.parametrize("builder", [tiny_sd15_pipeline, tiny_sdxl_pipeline])
def test_tiny_pipelines_generate_deterministically(builder):
    pipe = builder(seed=0)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe("a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(3),  # noqa: E731
                       output_type="np").images
    a, b = run(), run()
    assert a.shape == (1, native_resolution(pipe), native_resolution(pipe), 3)
    np.testing.assert_array_equal(a, b)


def test_load_pipeline_from_local_folder(tiny_sd15_dir):
    pipe = load_pipeline(str(tiny_sd15_dir), device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.dtype == torch.float32


def test_resolve_model_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))
    # Tests run with HF_HUB_OFFLINE=1 (conftest): a hub id that is not in the local cache fails at once ...
    with pytest.raises(FileNotFoundError, match="not a hub model in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model("stabilityai/stable-diffusion-xl-base-1.0")
    # ... and one in the cache is passed on to diffusers as is.
    import diffpref.models.loading as loading

    monkeypatch.setattr(loading, "_cached_index", lambda model: "/cache/model_index.json")
    assert resolve_model("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_xformers_refused_without_cuda():
    with pytest.raises(RuntimeError, match="sdpa"):
        check_attention("xformers")
    with pytest.raises(ValueError, match="valid choices"):
        check_attention("flash")


def test_xformers_probe_names_a_broken_install(monkeypatch):
    """An xformers that imports but has no working kernel (a wheel built for another torch) is refused
    with the reason, not found out deep inside the first attention call."""
    import sys
    import types

    from diffpref.models.loading import xformers_problem

    def no_kernel(query, key, value, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=no_kernel)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    problem = xformers_problem(device="cpu")
    assert "does not run" in problem and "NotImplementedError" in problem and "matches this torch" in problem

    fake.ops.memory_efficient_attention = lambda query, key, value, **kwargs: query
    assert xformers_problem(device="cpu") is None


def test_config_loader(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nunet_steps: 10\n")
    cfg = load_config(PretrainConfig, path, ["vae_lr=0.01"])
    assert (cfg.seed, cfg.unet_steps, cfg.vae_lr) == (3, 10, 0.01)
    with pytest.raises(ConfigError, match="valid keys are:.*unet_steps"):
        load_config(PretrainConfig, path, ["unet_stpes=3"])
    with pytest.raises(ConfigError):
        load_config(PretrainConfig, path, ["seed=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(PretrainConfig, path, ["seed"])
