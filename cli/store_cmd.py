"""`splitvlm store` (not yet built)."""

import click


@click.group("store")
def command() -> None:
    """Inspect and maintain an embedding store (not yet built)."""
