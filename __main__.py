"""`python -m splitvlm`: the command line."""

from splitvlm.cli.main import main

if __name__ == "__main__":
    main()
