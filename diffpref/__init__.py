"""diffpref: personalize text-to-image diffusion models from human preferences."""

__version__ = "0.1.0"
