import os

# Tests never reach a model hub: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    """A random tiny SD1.5-architecture pipeline saved as a diffusers folder."""
    from diffpref.models.builders import tiny_sd15_pipeline

    path = tmp_path_factory.mktemp("tiny_sd15")
    tiny_sd15_pipeline(seed=0).save_pretrained(path)
    return path
