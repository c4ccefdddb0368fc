"""Preference training: conditioning, the latent/prompt cache, and the trainers built on them."""
