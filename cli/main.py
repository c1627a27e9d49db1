"""`splitvlm` entry point: a click group; each command lives in its own module."""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import click

from splitvlm.core.errors import SplitVLMError, first_line

# command name -> its module in splitvlm.cli, imported only when the command is run or listed:
# `splitvlm store ...` then imports neither torch nor vLLM (docs/install.md)
COMMANDS = {"encode": "encode_cmd", "decode": "decode_cmd", "verify": "verify_cmd", "serve": "serve_cmd",
            "store": "store_cmd", "demo": "demo_cmd", "make-model": "model_cmd", "env": "env_cmd",
            "jobs": "jobs_cmd"}


class LazyGroup(click.Group):
    """A group that imports a command's module on first use; one that cannot be imported here fails when run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            try:
                command = importlib.import_module(f"splitvlm.cli.{COMMANDS[name]}").command
            except ImportError as exc:  # a store-only install has no torch
                command = _unavailable(name, exc)
            accept_debug(command)
            self.add_command(command, name)
        return super().get_command(ctx, name)


def _unavailable(name: str, exc: ImportError) -> click.Command:
    reason = f"needs {exc.name or first_line(exc)}, not installed here"

    def fail(args: tuple[str, ...]) -> None:  # --debug shows the import's traceback
        raise SplitVLMError(f"splitvlm {name} {reason} (see docs/install.md)") from exc

    return click.Command(name, callback=fail, help=f"(unavailable: {reason})", params=[click.Argument(["args"], nargs=-1)],
                         context_settings={"ignore_unknown_options": True})


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
      splitvlm jobs --images images/ --prompt "Describe the image." --out jobs.jsonl
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
