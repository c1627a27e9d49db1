"""`splitvlm` entry point: a click group; each command lives in its own module."""

from __future__ import annotations

import os
import sys
import warnings

import click

from splitvlm.cli import (
    decode_cmd,
    demo_cmd,
    encode_cmd,
    env_cmd,
    model_cmd,
    serve_cmd,
    store_cmd,
    verify_cmd,
)
from splitvlm.core.errors import SplitVLMError, first_line


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="splitvlm")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Split Qwen-VL inference (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): pre-encode images into an LMDB store once, decode from it
    many times in vLLM, and verify the split path gives exactly the end-to-end bytes.

    \b
    Typical flow:
      splitvlm make-model --arch tiny --out models/tiny
      splitvlm encode --model models/tiny --store S images/
      splitvlm decode --model models/tiny --store S --jobs jobs.jsonl --out out.jsonl
      splitvlm verify --model models/tiny --store S --jobs jobs.jsonl

    \b
    Exit status:
      0  all done
      1  error: the run could not do what was asked (one `error:` line)
      2  usage error: a bad option or argument, refused before any work
      3  some inputs, jobs or entries failed, the rest were done
      4  a mismatch found: verify not identical, or a decode spot check differs

    --debug (before or after the command) shows full tracebacks.
    """
    ctx.obj = {"debug": debug}


def accept_debug(command: click.Command) -> None:
    """Let --debug follow the command too (main() reads it from the arguments)."""
    command.params.append(click.Option(["--debug"], is_flag=True, expose_value=False,
                                       help="Show full tracebacks instead of one-line errors."))
    for sub in getattr(command, "commands", {}).values():
        accept_debug(sub)


for module in (encode_cmd, decode_cmd, verify_cmd, serve_cmd, store_cmd, demo_cmd, model_cmd, env_cmd):
    accept_debug(module.command)
    cli.add_command(module.command)


def main() -> None:
    """Run the command line; exit status as in `splitvlm --help`."""
    debug = "--debug" in sys.argv[1:]
    if not debug:  # library chatter would bury splitvlm's own lines
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    else:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SplitVLMError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except SystemExit:
        raise
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; what was stored or written so far is kept (encode reruns resume; decode with --resume)",
                   err=True)
        sys.exit(130)
    except Exception as exc:  # from vLLM, torch or the OS: one line, the traceback with --debug
        if debug:
            raise
        reason = first_line(exc)
        what = reason if reason == type(exc).__name__ else f"{type(exc).__name__}: {reason}"
        click.echo(f"error: {what} (run with --debug for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
