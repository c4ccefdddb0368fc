"""Personalization of a diffusion model from one user's preferences (PPD-style user conditioning).

Modules:
    attention  decoupled user cross-attention: processors, installation, state dicts, guards.
"""
