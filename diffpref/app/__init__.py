"""The rating app: people rate pairs of images and see a model personalized to their choices.

- ``config``   ``AppConfig`` and the ``diffpref app`` flags made from it (light: the CLI imports it).
- ``store``    ``RatingStore``, the SQLite store of users, images, pairs and ratings (``validation``:
               its input checks; ``export``: Pick-a-Pic parquet and likes manifests).
- ``pairs``    active pair selection (a Laplace posterior over CLIP embeddings, BALD).
- ``profile``  what a person's tokens change, on probe prompts.
- ``service``  ``RatingService``: the app's logic without a web framework.
- ``server``   the Gradio UI and API over the service.

Names are loaded on first use, so ``import diffpref.app.config`` does not load the store.
"""

_LAZY = {"NotFoundError": "diffpref.app.store", "RatingConflictError": "diffpref.app.store",
         "RatingStore": "diffpref.app.store"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffpref.app' has no attribute {name!r}")
