"""Shared, model-agnostic tensor utilities (never imports vaegen or ddpm)."""
