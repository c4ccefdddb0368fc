"""Encode preference data once: VAE latents and prompt embeddings on disk, read back as a torch Dataset.

A trainer that ran the VAE and the text encoder(s) every step would spend most of its time
(and, for SDXL, most of its memory) re-computing the same numbers. The cache is split by job:

  layout   the files of a cache, ``CACHE_VERSION`` and the key (what the numbers depend on)
  sources  the data source cut into chunks of source rows, decoded in DataLoader workers
  builder  every process encodes its share of the chunks; process 0 writes the index
  readers  ``PreferenceCache`` / ``RatingCache``: a finished cache as a Dataset
"""

from diffpref.training.cache.builder import (
    build_preference_cache,
    build_rating_cache,
    process_group,
)
from diffpref.training.cache.layout import (
    CACHE_VERSION,
    CHUNK_ROWS,
    cache_key,
    data_identity,
    key_material,
    model_identity,
)
from diffpref.training.cache.readers import PreferenceCache, RatingCache

__all__ = [
    "CACHE_VERSION",
    "CHUNK_ROWS",
    "PreferenceCache",
    "RatingCache",
    "build_preference_cache",
    "build_rating_cache",
    "cache_key",
    "data_identity",
    "key_material",
    "model_identity",
    "process_group",
]
