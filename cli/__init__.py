"""The `splitvlm` command line."""
