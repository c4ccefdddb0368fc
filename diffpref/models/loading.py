"""One loader for every model diffpref runs: the embedded default, a local folder, or a hub id.

``load_pipeline("embedded")`` never touches the network. A local folder is read offline too. A
hub id (``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-xl-base-1.0``) is passed
to diffusers as is, so it downloads where the user has network and fails with diffusers' own
message where they do not.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from diffpref.paths import EMBEDDED_NAMES, embedded_model_path, require

ATTENTION_BACKENDS = ("sdpa", "xformers")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model(model: str | os.PathLike | None) -> str:
    """'embedded' (or None) -> the shipped folder; an existing path -> itself; anything else -> a hub id."""
    if model is None or str(model) in EMBEDDED_NAMES:
        return str(require(embedded_model_path(), "the embedded world model"))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(
                f"{path} has no model_index.json, so it is not a diffusers pipeline folder. "
                "Point --model at the folder that `pipe.save_pretrained(...)` wrote (or a hub id)."
            )
        return str(path)
    if str(model).startswith((".", "/", "~")) or os.sep in str(model).strip("/").split("/", 2)[-1]:
        raise FileNotFoundError(f"model folder {model} does not exist")
    return str(model)


def pipeline_class_name(model: str) -> str | None:
    index = Path(model) / "model_index.json"
    if index.exists():
        return json.loads(index.read_text()).get("_class_name")
    return None


def xformers_problem(device: str = "cuda") -> str | None:
    """Why xformers attention cannot run here, or None if a tiny half-precision call of it works.

    Importing ``xformers.ops`` is not enough: a wheel built for another PyTorch / CUDA imports fine,
    warns, and then has no kernels (seen with xformers 0.0.35 on torch 2.11 + CUDA 13).
    """
    if device == "cuda" and not torch.cuda.is_available():
        return "it needs a CUDA GPU and none is available"
    try:
        import xformers.ops
    except ImportError:
        return "the xformers package is not installed (pip install 'diffpref[gpu]')"
    try:
        q = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as error:  # NotImplementedError (no kernel), RuntimeError (CUDA), ...
        return (f"xformers is installed but its attention kernel does not run ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); it was probably built for another "
                "PyTorch/CUDA: install the xformers build that matches this torch")
    return None


@functools.cache
def _xformers_problem_here() -> str | None:
    """`xformers_problem` on this process's GPU, probed once."""
    return xformers_problem()


def xformers_available() -> bool:
    return _xformers_problem_here() is None


def check_attention(attention: str) -> str:
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={attention!r}; valid choices are {ATTENTION_BACKENDS}")
    if attention == "xformers" and not xformers_available():
        raise RuntimeError(
            f"attention='xformers' cannot be used: {_xformers_problem_here()}. Use attention='sdpa' "
            "(PyTorch's memory-efficient attention, the default) instead."
        )
    return attention


def load_pipeline(model: str | os.PathLike | None = "embedded", device: str | None = None,
                  dtype: torch.dtype | None = None, attention: str = "sdpa"):
    """A diffusers text-to-image pipeline (SD1.5- or SDXL-style, picked from model_index.json) ready to run."""
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    source = resolve_model(model)
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    kwargs = {"dtype": dtype}
    if pipeline_class_name(source) in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        # Local SD folders: drop the safety checker (the world model has none; real ones are the user's choice).
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(source, **kwargs)
    pipe = pipe.to(device)
    if check_attention(attention) == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_resolution(pipe) -> int:
    """The image size the pipeline was trained at (64 for the embedded model, 512 SD1.5, 1024 SDXL)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def load_adapter(pipe, adapter: str | os.PathLike):
    """Apply a trained adapter: a diffusers LoRA folder/file, or a full UNet folder (``unet/`` or the UNet itself)."""
    path = Path(adapter)
    if not path.exists():
        raise FileNotFoundError(f"adapter {adapter} does not exist")
    if path.is_file() or (path / "pytorch_lora_weights.safetensors").exists():
        pipe.load_lora_weights(str(path))
        return pipe
    unet_dir = path / "unet" if (path / "unet" / "config.json").exists() else path
    if (unet_dir / "config.json").exists():
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(unet_dir, dtype=pipe.unet.dtype).to(pipe.device)
        return pipe
    raise FileNotFoundError(f"{adapter} holds neither pytorch_lora_weights.safetensors nor a UNet config.json")
