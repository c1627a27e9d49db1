"""The public API: five names at the top, cheap to import, and `splitvlm --help` lists every command."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner


def test_top_level_names():
    import splitvlm
    from splitvlm import Config, Decoder, EmbeddingStore, Encoder, verify

    assert callable(verify) and verify.__call__  # the package calls splitvlm.verify.verify
    assert Encoder.__name__ == "Encoder" and Decoder.__name__ == "Decoder"
    assert EmbeddingStore.__name__ == "EmbeddingStore" and Config(model="m").profile == "exact"
    assert splitvlm.__version__


def test_import_is_cheap():
    code = "import sys, splitvlm; import splitvlm.cli.main; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_help_lists_commands():
    from splitvlm.cli.main import cli

    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("encode", "decode", "verify", "store", "demo", "make-model", "env"):
        assert f"  {name} " in result.output
    assert "not yet" not in result.output.lower()


def test_unknown_model_is_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "splitvlm.cli.main", "encode", "--model", str(tmp_path / "nope"),
                          "--store", str(tmp_path / "s"), str(tmp_path)], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error:") and len(out.stderr.strip().splitlines()) == 1


def test_batch_invariant_kernels_are_found_in_this_vllm():
    """The exact profile's matmul override must find vLLM's kernels whichever version moved them."""
    from splitvlm.core.invariance import _OPS, _kernels

    kernels = _kernels()
    assert all(hasattr(kernels, fn) for _, fn in _OPS if not fn.endswith("out_batch_invariant"))


def test_first_difference():
    from splitvlm.decoder.pipeline import first_difference

    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
