"""Shared ground of splitvlm: config, profiles, image loading, identity, the vLLM engine."""

__version__ = "0.1.0"  # splitvlm's version (the top package re-exports it; core never imports the top package)
