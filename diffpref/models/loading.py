"""One loader for every model diffpref runs: the embedded default, a local folder, or a hub id.

``load_pipeline("embedded")`` never touches the network. A local folder is read offline too. A
hub id (``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-xl-base-1.0``) is used
from the local Hugging Face cache when it is there, and otherwise checked with one request before
diffusers downloads it. A name that is none of these (a typo such as ``embeded``) fails at once in
one line naming what was looked for: no download retries, and none at all with ``HF_HUB_OFFLINE=1``.

The SD1.5 safety checker is always off (``safety_checker=None``; a warning says so when the model
has one): it blacks out the images it flags, and diffpref would then train on, score and report
black squares. Generation, evaluation and the app all load through here. Check images yourself
before you publish them.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
from pathlib import Path

import torch

from diffpref.paths import EMBEDDED_NAMES, embedded_model_path, require

ATTENTION_BACKENDS = ("sdpa", "xformers")
HUB_TIMEOUT_S = 10  # one request to ask the hub whether a model exists; no retries

logger = logging.getLogger(__name__)


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
    return _resolve_hub_id(str(model))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")


def _cached_index(model: str) -> str | None:
    """The cached model_index.json of hub id ``model``, or None (not cached, or not a valid hub id)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(model, "model_index.json")
    except HFValidationError:  # not a valid repo id, so it cannot be cached either
        return None
    return found if isinstance(found, str) else None


def _resolve_hub_id(model: str) -> str:
    """``model`` when it names a hub pipeline that is cached or that the hub has; otherwise a one-line
    FileNotFoundError saying what was looked for (the CLI prints it without a traceback)."""
    if _cached_index(model):
        return model
    close = difflib.get_close_matches(model, EMBEDDED_NAMES, n=1, cutoff=0.75)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    looked = (f"model '{model}' is not 'embedded', not a local folder ({Path(model).expanduser().absolute()} does "
              f"not exist) and not a hub model in the local Hugging Face cache")
    if _hub_offline():
        raise FileNotFoundError(f"{looked}; the hub was not asked (HF_HUB_OFFLINE is set){hint}")
    from huggingface_hub import model_info
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    try:
        model_info(model, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return model  # it exists; diffusers says how to get access
    except (RepositoryNotFoundError, HFValidationError):
        raise FileNotFoundError(f"{looked}, nor a model on the hub{hint}") from None
    except Exception as error:  # no network, DNS, proxy, timeout: one try, no retries
        raise FileNotFoundError(f"{looked}, and the hub could not be reached ({type(error).__name__}: "
                                f"{str(error).splitlines()[0] if str(error) else 'no detail'}){hint}") from None
    return model


def _model_index(source: str) -> dict:
    """model_index.json of a local folder or hub id (the hub file is what diffusers fetches first anyway)."""
    index = Path(source) / "model_index.json"
    if not index.exists():
        index = _cached_index(source)
        if index is None:
            from huggingface_hub import hf_hub_download

            index = hf_hub_download(source, "model_index.json")
    return json.loads(Path(index).read_text())


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
    """A diffusers text-to-image pipeline (SD1.5- or SDXL-style, picked from model_index.json) ready to run.

    The safety checker is never loaded (SD1.5 ships one): it would black out the images it flags, and
    those black images would be scored, trained on and reported. A warning says so when the model has one.
    """
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    source = resolve_model(model)
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    kwargs = {"dtype": dtype}
    index = _model_index(source)
    if index.get("safety_checker", [None, None])[0] is not None:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
        logger.warning("diffpref: the safety checker of %s is off (diffpref scores raw images; a checker would "
                       "black out the ones it flags). Check images yourself before publishing them.", model)
    if index.get("_class_name") in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    else:
        pipe = AutoPipelineForText2Image.from_pretrained(source, **kwargs)
    if getattr(pipe, "safety_checker", None) is not None:  # e.g. a pipeline class that loads one regardless
        pipe.safety_checker = None
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
