"""diffpref: personalize text-to-image diffusion models from human preferences."""

__version__ = "0.1.0"

_LAZY = {
    # diffusers resolves pipeline components as getattr(import_module("diffpref"), class_name).
    "UserEncoder": "diffpref.personalize.encoder",
    "SetUserEncoder": "diffpref.personalize.encoder",
    "EvidenceUserEncoder": "diffpref.personalize.encoder",
    "PersonalizedPipeline": "diffpref.personalize.pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffpref' has no attribute {name!r}")
