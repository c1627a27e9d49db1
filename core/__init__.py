"""Shared ground of splitvlm: config, profiles, image loading, identity, the vLLM engine."""
