"""`splitvlm make-model`: write a local random-weight Qwen-VL checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from splitvlm.tools.make_model import ARCHS


@click.command("make-model")
@click.option(
    "--arch",
    type=click.Choice(list(ARCHS)),
    default="tiny",
    show_default=True,
    help="tiny (Qwen2-VL), tiny-qwen2.5-vl, tiny-qwen3-vl: models of under 1M parameters for CPU "
    "tests, built in seconds, whose output reacts to its input; qwen2-vl-2b, qwen2.5-vl-3b, "
    "qwen3-vl-2b: the real Instruct models' architectures (build them on a GPU).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write; must be empty, new, or an earlier make-model output.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where the weights are drawn (cuda makes the real architectures in seconds).",
)
def command(arch: str, out: Path, seed: int, device: str) -> None:
    """Write a complete Qwen-VL checkpoint with random weights and a synthetic tokenizer.

    The directory holds config.json, model.safetensors, tokenizer and processor files and
    the chat template; vLLM and transformers load it offline. No model hub is needed.

    \b
    Examples:
      splitvlm make-model --arch tiny --out models/tiny
      splitvlm make-model --arch qwen2-vl-2b --out models/2b --device cuda
      splitvlm make-model --arch qwen3-vl-2b --out models/qwen3-2b --device cuda
    """
    from splitvlm.tools.make_model import human_count, make_model, read_marker

    if out.exists() and any(out.iterdir()) and read_marker(out) is None:
        raise click.ClickException(
            f"{out} is not empty and was not written by make-model; choose another --out"
        )
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException("--device cuda: no CUDA device is visible here")
    make_model(arch, str(out), seed=seed, device=device)
    info = read_marker(out) or {}
    parameters = info.get("parameters", 0)
    click.echo(
        f"wrote {arch} model to {out} ({human_count(parameters)} parameters, "
        f"{parameters:,}; seed {seed}, {info.get('seconds', '?')} s)"
    )
