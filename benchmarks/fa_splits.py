"""Is the tower's FlashAttention batch-invariant as vLLM calls it, with and without splitvlm's one split?

    python -m benchmarks.fa_splits [--commit SHA] [--out benchmarks/results/fa_splits.json]

GPU only. Random queries, keys and values for images of several sizes (16 to 4,096 patches, the
2B tower's 16 heads of 80) go through vLLM's own ViT wrapper (`flash_attn_maxseqlen_wrapper`),
all in one varlen call and each image alone, first as vLLM calls it (no num_splits: FA3 picks
the split count from the call's size), then after `single_split_flash_attention()`. The report
says per image and per setting whether its rows were bit-identical alone and in the batch: the
direct check behind the exact tower's setting (the GPU check proves it end to end).
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import RESULTS, command, now, write_report

SIZES = (16, 64, 256, 1024, 4096, 100, 2000)  # patches per image
HEADS, HEAD_DIM = 16, 80


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commit", default="", help="The commit measured (a device copy has no .git).")
    ap.add_argument("--out", default=str(RESULTS / "fa_splits.json"))
    return ap.parse_args(argv)


def attention(wrapper, q, k, v, lens: list[int], fa_version: int) -> torch.Tensor:
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=q.device)
    return wrapper(q, k, v, 1, False, fa_version, HEAD_DIM ** -0.5, cu, torch.tensor(max(lens)))


def compare(wrapper, q, k, v, fa_version: int) -> dict[str, bool]:
    """Each image's rows alone against the same rows in one call with every image."""
    together = attention(wrapper, q, k, v, list(SIZES), fa_version)
    out, start = {}, 0
    for n in SIZES:
        alone = attention(wrapper, q[:, start:start + n], k[:, start:start + n], v[:, start:start + n], [n], fa_version)
        out[str(n)] = torch.equal(alone, together[:, start:start + n])
        start += n
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("fa_splits needs a CUDA device (vLLM's FlashAttention)", file=sys.stderr)
        raise SystemExit(2)
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm.v1.attention.ops.vit_attn_wrappers import flash_attn_maxseqlen_wrapper

    from splitvlm.core.identity import environment
    from splitvlm.core.invariance import single_split_flash_attention

    fa_version = get_flash_attn_version(head_size=HEAD_DIM) or 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, sum(SIZES), HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    as_vllm_calls_it = compare(flash_attn_maxseqlen_wrapper, q, k, v, fa_version)
    installed = single_split_flash_attention()
    one_split = compare(flash_attn_maxseqlen_wrapper, q, k, v, fa_version)
    report = {"benchmark": "fa_splits", "date": now(), "commit": args.commit,
              "command": command("benchmarks.fa_splits", argv), "environment": environment(),
              "fa_version": fa_version, "heads": HEADS, "head_dim": HEAD_DIM, "sizes": SIZES,
              "alone_equals_batched": {"as_vllm_calls_it": as_vllm_calls_it, "one_split": one_split},
              "one_split_installed": installed}
    path = write_report(report, args.out)
    for name, result in report["alone_equals_batched"].items():
        print(f"{name}: {sum(result.values())}/{len(result)} images identical alone and batched {result}")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
