"""Start vLLM's own OpenAI-compatible server with splitvlm's engine arguments, connector and middleware."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

from splitvlm.core.config import Config
from splitvlm.core.errors import SplitVLMError
from splitvlm.serve.settings import SECRET_VARIABLE, SETTINGS_VARIABLE, ServeSettings

CONNECTOR = {"ec_connector": "StoreConnector", "ec_role": "ec_both",
             "ec_connector_module_path": "splitvlm.serve.connector"}
MIDDLEWARE = "splitvlm.serve.middleware.StoreKeys"
# Set by splitvlm serve and refused among the extra vLLM options: they decide the output's bytes
# (with the profile's own settings), or the route from the store, or have a splitvlm option.
RESERVED = ("model", "hf_overrides", "dtype", "seed", "enable_mm_embeds", "mm_processor_kwargs",
            "generation_config", "chat_template", "chat_template_content_format", "ec_transfer_config",
            "middleware", "host", "port", "api_key", "allowed_local_media_path", "kv_transfer_config")


class UsageError(SplitVLMError):
    """A bad option, refused before any engine starts (exit status 2)."""


@dataclass
class ServeOptions:
    cfg: Config  # model, store, profile and engine settings, as the other commands take them
    host: str = "127.0.0.1"
    port: int = 8000
    store_new: bool = False
    allowed_media_path: str | None = None
    api_key: str | None = None
    extra: list[str] = field(default_factory=list)  # vLLM server options, after `--`


def _vllm():
    """vLLM's serve parser, its check and run_server (moved to vllm.entrypoints.launchers after 0.26)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:
        from vllm.entrypoints.launchers.api_server.entry import run_server
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    except ImportError:  # vLLM 0.26
        from vllm.entrypoints.openai.api_server import run_server
        from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    parser = make_arg_parser(FlexibleArgumentParser(prog="splitvlm serve --"))

    def refuse(message: str):
        raise UsageError(f"vLLM option: {message}")

    parser.error = refuse  # one line and exit status 2, not argparse's usage text
    return parser, validate_parsed_serve_args, run_server


def to_argv(kwargs: dict[str, Any]) -> list[str]:
    """Engine arguments as vLLM's command line spells them (bools as --x / --no-x, dicts as JSON)."""
    argv = []
    for name, value in kwargs.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return argv


def prepare(opts: ServeOptions) -> tuple[Any, dict[str, str], str]:
    """vLLM's parsed server arguments, the environment its processes need, and the run folder.

    Everything is checked here, before any engine starts; UsageError names the bad option."""
    from splitvlm.core.engine import engine_args, on_gpu
    from splitvlm.core.families import family_of_model
    from splitvlm.core.profiles import get_profile

    cfg = opts.cfg
    gpu = on_gpu()
    kwargs = engine_args(cfg, family_of_model(cfg.model).split_arch, gpu)
    parser, validate, _ = _vllm()
    given = parser.parse_args(["--model", cfg.model, *opts.extra])
    for name in sorted(set(RESERVED) | set(get_profile(cfg.profile).engine_kwargs(gpu))):
        if name != "model" and getattr(given, name, None) != parser.get_default(name):
            raise UsageError(f"--{name.replace('_', '-')} is set by splitvlm serve (profile {cfg.profile} "
                             "or its own options); leave it out of the vLLM options")
    run_dir = tempfile.mkdtemp(prefix="splitvlm-serve-")
    try:
        return _finish(opts, kwargs, given, run_dir)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _finish(opts: ServeOptions, kwargs: dict[str, Any], given: Any, run_dir: str) -> tuple[Any, dict[str, str], str]:
    from splitvlm.core.provenance import Provenance

    cfg = opts.cfg
    parser, validate, _ = _vllm()
    settings = ServeSettings(
        model=cfg.model, store=os.path.abspath(cfg.store or ""), profile=cfg.profile, store_new=opts.store_new,
        lock=cfg.lock, allow_mismatch=cfg.allow_mismatch, run_dir=run_dir,
        provenance=dataclasses.asdict(Provenance.of(cfg)),
        allowed_media_path=os.path.abspath(opts.allowed_media_path) if opts.allowed_media_path else "",
        allowed_media_domains=given.allowed_media_domains)
    connector = {**CONNECTOR, "ec_connector_extra_config": settings.to_dict()}
    argv = ["--model", cfg.model, *to_argv({k: v for k, v in kwargs.items() if k != "model"}),
            "--host", opts.host, "--port", str(opts.port), "--generation-config", "vllm",
            "--chat-template-content-format", "openai", "--ec-transfer-config", json.dumps(connector),
            "--middleware", MIDDLEWARE]
    if settings.allowed_media_path:
        argv += ["--allowed-local-media-path", settings.allowed_media_path]
    args = parser.parse_args(argv + opts.extra)
    try:
        validate(args)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"vLLM options: {exc}") from None
    env = {SETTINGS_VARIABLE: json.dumps(settings.to_dict()), SECRET_VARIABLE: secrets.token_hex(32)}
    if opts.api_key:
        env["VLLM_API_KEY"] = opts.api_key  # read by vLLM's authentication and by splitvlm's middleware
    return args, env, run_dir


def serve(opts: ServeOptions) -> None:
    """Run the server until it is stopped (Ctrl-C, SIGTERM)."""
    from splitvlm.core.engine import prepare_process

    prepare_process(opts.cfg.profile)  # the profile's environment, read by vLLM's processes and the plugin
    args, env, run_dir = prepare(opts)
    os.environ.update(env)
    cfg = opts.cfg
    print(f"splitvlm serve: http://{opts.host}:{opts.port}/v1 (model {cfg.model}, store {cfg.store}, profile "
          f"{cfg.profile}{', --store-new' if opts.store_new else ''}); starting vLLM", file=sys.stderr, flush=True)
    try:
        import uvloop
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

        _, _, run_server = _vllm()
        cli_env_setup()  # as `vllm serve` does: worker processes are spawned
        if (getattr(args, "api_server_count", None) or 1) > 1:  # as `vllm serve` does: N frontends, one engine
            from vllm.entrypoints.cli.serve import run_multi_api_server

            run_multi_api_server(args)
        else:
            uvloop.run(run_server(args))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
