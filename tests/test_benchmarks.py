"""The benchmarks in --smoke mode on the session engine, and the plots of their results."""

from __future__ import annotations

import importlib
import json
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    """A module of the benchmarks package (a plain folder at the repo root, run as python -m)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


@pytest.fixture(scope="module")
def results(engine, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench_results")
    for name in ("bench_encode", "bench_decode", "bench_cache"):
        argv = ["--smoke", "--model", tiny_model, "--out", str(out / f"{name}.json"), "--dir", str(out)]
        bench(name).main(argv, engine=engine)
    return out


def read(results: Path, name: str) -> dict:
    return json.loads((results / f"{name}.json").read_text())


HEADER = {"benchmark", "date", "command", "device", "vllm", "torch", "profile", "environment", "smoke", "goals", "engine"}


def test_encode_report(results):
    report = read(results, "bench_encode")
    assert HEADER <= set(report) and report["smoke"] and report["profile"] == "exact"
    assert report["peak"]["tflops"] > 0 and "--smoke" in report["command"]
    assert set(report["mixes"]) == {"8", "16"}
    for mix in report["mixes"].values():
        for side in ("encoder", "tower"):
            for rate in ("images_per_s", "patches_per_s", "tflops", "share_of_peak"):
                assert mix[side][rate] > 0, (side, rate)
        assert 0 < mix["encoder"]["store_share"] < 1 and mix["patches"] > 0
    assert [row["size"] for row in report["per_size"]] == ["64x64", "96x128", "128x96", "112x112"]
    assert all(row["images_per_s"] > 0 and row["patches_per_image"] > 0 for row in report["per_size"])
    assert set(report["goals"]) == {"encoder_share_of_peak", "store_share_of_wall"}


def test_decode_report(results):
    report = read(results, "bench_decode")
    assert HEADER <= set(report) and report["cuda_graphs"] is False
    assert [r["max_tokens"] for r in report["results"]] == [4, 8]
    for row in report["results"]:
        for side in ("end_to_end", "store"):
            assert row[side]["requests_per_s"] > 0 and row[side]["output_tokens_per_s"] > 0
            assert row[side]["output_tokens"] == row["jobs"] * row["max_tokens"]  # EOS ignored
        assert row["speedup"] == pytest.approx(row["store"]["requests_per_s"] / row["end_to_end"]["requests_per_s"])
    assert set(report["goals"]) == {"speedup_at_4", "speedup_at_8"}


def test_plots(results, tmp_path):
    plots = bench("plots")
    written = plots.main(["--results", str(results), "--out", str(tmp_path / "img")])
    assert sorted(p.name for p in written) == sorted([plots.ENCODE_PNG, plots.DECODE_PNG])
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    assert plots.main(["--results", str(tmp_path / "none"), "--out", str(tmp_path / "img2")]) == []


def test_vision_flops_formula():
    shape = bench("common").VisionShape(depth=32, embed_dim=1280, mlp_ratio=4, merge=2, out_hidden=1536,
                                        patch=14, temporal_patch=2, channels=3)
    p, d = 1 * 32 * 40, 1280
    per_block = 2 * p * (4 * d * d + 2 * 4 * d * d) + 4 * p * p * d
    expected = 32 * per_block + 2 * p * (3 * 2 * 14 * 14) * d + 2 * (p / 4) * ((4 * d) ** 2 + 4 * d * 1536)
    assert shape.flops([1, 32, 40]) == pytest.approx(expected)
    assert shape.flops([1, 32, 40]) / 1e12 == pytest.approx(1.9, abs=0.1)  # about 1.9 TFLOP a 448x560 image


def test_cache_report(results):
    report = read(results, "bench_cache")
    assert report["identical"] and report["results"]["cache_warm"]["cached"] == report["jobs"]
    assert not report["results"]["cache_warm_no_engine"]["engine_started"]


def test_gpu_check_lane_c_speaks_batch_matrix_s_command_line(tmp_path):
    """The batch-matrix lane's arguments parse with batch_matrix's own parser (a mismatch cost a GPU run)."""
    from benchmarks import batch_matrix, gpu_check

    args = gpu_check.parse_args([])
    argv = gpu_check.matrix_argv(args, tmp_path, ["--jobs", str(tmp_path / "j.jsonl"), "--max-tokens", "32"])
    parsed = batch_matrix.parser().parse_args(argv)
    assert parsed.gpu_memory_utilization == args.lane_memory and parsed.kv_cache_memory_bytes == args.lane_kv_bytes
    assert parsed.max_model_len == args.max_model_len == 32768  # Qwen3-VL's 262,144 did not fit a lane's KV cache
    assert parsed.save_outputs == str(tmp_path / "batch_256.jsonl")


def test_bench_vs_vllm_variants_are_real_settings():
    """Every ablation variant changes a setting that exists: a plugin value the plugin parses, engine
    arguments of this vLLM, a profile splitvlm has; an unknown variant is refused before any work."""
    from vllm.engine.arg_utils import EngineArgs

    from splitvlm.core.profiles import PROFILES, settings_from

    module = bench("bench_vs_vllm")
    for name, variant in module.VARIANTS.items():
        if "profile_value" in variant:
            assert settings_from(variant["profile_value"]) != PROFILES["exact"].settings(gpu=True), name
        assert set(variant.get("vllm_args", {})) <= set(EngineArgs.__dataclass_fields__), name
        assert variant.get("profile", "exact") in PROFILES, name
    with pytest.raises(SystemExit):
        module.parse_args(["--model", "m", "--variants", "exact,turbo"])
    assert module.parse_args(["--model", "m", "--variants", "exact,fast"]).variants == "exact,fast"
    encode = bench("bench_encode")  # the same variants for the tower (bench_encode --vs-default --variants)
    assert encode.VARIANTS is module.VARIANTS
    with pytest.raises(SystemExit):
        encode.parse_args(["--model", "m", "--vs-default", "--variants", "exact,turbo"])


def test_bench_vs_vllm_rounds_and_partial_report():
    """--rounds caps a cell at rounds x batch jobs; a failed variant is recorded and the others are still reported."""
    module = bench("bench_vs_vllm")
    args = module.parse_args(["--model", "m", "--variants", "exact,fast", "--rounds", "2", "--batches", "2,8",
                              "--max-tokens", "4", "--jobs", "8"])
    cell = {"max_tokens": 4, "batch": 2, "jobs": 4, "requests_per_s": 2.0}
    probe = {"token_ids": [[1, 2], [3]], "batch_invariant": 2}
    sides = {"reference": {"engine_start_s": 1.0, "engine": {}, "cells": [cell], "probe": probe},
             "exact": {"engine_start_s": 1.0, "engine": {}, "cells": [{**cell, "requests_per_s": 1.0}], "probe": probe}}
    plan = {"encode_s": 0.0, "probe": ["a", "b"]}
    report = module.summarize(args, [], plan, sides, {"fast": "exit 1: boom"})
    assert report["cells"][0]["ratio"] == 0.5 and not report["goal_met"]
    assert not report["complete"] and report["failed_sides"] == {"fast": "exit 1: boom"}
    assert report["ablation"]["exact"]["probe_same_as_exact"] == "2/2" and "fast" not in report["ablation"]
    assert [module.cell_jobs(args, b) for b in (2, 8)] == [4, 8]
    assert module.cell_jobs(module.parse_args(["--model", "m", "--jobs", "8"]), 2) == 8


def test_bench_serve_encodes_under_the_profile_it_serves():
    """Entries are keyed by profile: a fast serve over an exact store found none of them (H200, 15e1d86)."""
    module = bench("bench_serve")
    assert module.encode_profile(["--profile", "fast"]) == ["--profile", "fast"]
    assert module.encode_profile(["--profile=fast", "--", "--api-server-count", "4"]) == ["--profile", "fast"]
    assert module.encode_profile(["--", "--api-server-count", "4"]) == []


def test_bench_ray_encode_takes_several_ray_batches():
    """--ray-batch 32,256 runs --ray once per value (the lever left to measure on two GPUs); bad values are refused."""
    module = bench("bench_ray_encode")
    assert module.parse_args(["--model", "m", "--gpus", "2", "--ray-batch", "32,256"]).ray_batches == [32, 256]
    assert module.parse_args(["--model", "m", "--gpus", "0"]).ray_batches == [32]
    assert module.parse_args(["--model", "m", "--gpus", "2"]).ray_batches == [256]  # encode's own default
    for bad in ("32,x", "0"):
        with pytest.raises(SystemExit):
            module.parse_args(["--model", "m", "--gpus", "2", "--ray-batch", bad])


def test_encode_vs_default_ratios(results):
    """--vs-default's ratios: exact / fast images per second per mix (encoder, tower) and per image size."""
    exact = read(results, "bench_encode")
    fast = json.loads(json.dumps(exact))
    for mix in fast["mixes"].values():
        mix["encoder"]["images_per_s"] *= 2
    ratios = bench("bench_encode").side_ratios(fast, exact)
    assert ratios["mix8_encoder"] == ratios["mix16_encoder"] == 0.5
    assert ratios["mix8_tower"] == 1.0 and ratios["size_64x64_tower"] == 1.0
    assert len(ratios) == 4 + len(exact["per_size"])


def test_bench_serve_puts_the_port_before_vllms_options():
    """Options after `--` go to vLLM's server unchanged: the benchmark's --port must stay splitvlm's."""
    module = bench("bench_serve")
    assert module.with_port(["splitvlm", "serve"], 8) == ["splitvlm", "serve", "--port", "8"]
    assert module.with_port(["serve", "--", "--api-server-count", "4"], 8) == \
        ["serve", "--port", "8", "--", "--api-server-count", "4"]


def test_bench_serve_reads_where_a_request_spent_its_time():
    """vLLM's per-request histograms, summed over engines and API servers, give each phase's mean over the run."""
    module = bench("bench_serve")
    before = module.histogram_totals(
        '# HELP vllm:request_prefill_time_seconds Histogram\n'
        'vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 1.0\n'
        'vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 1.0\n'
        'vllm:request_prefill_time_seconds_bucket{engine="0",le="0.3",model_name="m"} 1.0\n')
    after = module.histogram_totals(
        'vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 3.0\n'
        'vllm:request_prefill_time_seconds_sum{engine="1",model_name="m"} 4.0\n'
        'vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 2.0\n'
        'vllm:request_prefill_time_seconds_count{engine="1",model_name="m"} 2.0\n'
        'vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 9.0\n'
        'splitvlm_tower_images_total 0\n')
    assert after["request_prefill_time_seconds_sum"] == 7.0
    assert module.phase_means(before, after) == {"request_prefill_time_mean_s": 2.0}


def test_the_client_floor_server_answers_like_vllms_stream(tmp_path):
    """bench_serve's floor: a real loopback server with no model; the client reads its stream like vLLM's."""
    module = bench("bench_serve")
    urls = ["data:image/png;base64,AAAA"] * 4
    floor = module.client_floor(urls, urls[0], 3, tmp_path)
    assert floor["requests"] == 4 and floor["requests_per_s"] > 0
    assert 0 < floor["ttft_p50_s"] <= floor["seconds"]
    assert floor["engine_phases"] == {} and floor["counters"] == {}


def test_bench_serve_sends_from_several_client_processes_on_one_clock(tmp_path):
    """One event loop caps what the client can measure (240 requests/s on the H200 host at f4f89f5), so
    the requests can be dealt out to several processes; their times share the parent's clock."""
    module = bench("bench_serve")
    urls = [f"data:image/png;base64,{'A' * 4 * n}" for n in range(1, 9)]
    floor = module.client_floor(urls, urls[0], 3, tmp_path, procs=3)
    assert floor["requests"] == 8 and floor["client_procs"] == 3
    assert 0 < floor["ttft_p50_s"] <= floor["ttft_p99_s"] <= floor["seconds"] < 60
    from benchmarks.serve_client import fire

    with pytest.raises(RuntimeError, match="a client process failed"):  # nothing listens there
        fire(f"http://127.0.0.1:{module.free_port()}", [b"{}"] * 2, procs=2)


def test_profile_tower_sorts_kernels_into_classes_and_measures_each_gap():
    module = bench("profile_tower")
    assert module.kernel_class("matmul_kernel_persistent") == "matmul"  # vLLM's batch-invariant Triton GEMM
    assert module.kernel_class("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT") == "matmul"  # cuBLAS on Hopper
    assert module.kernel_class("aten::addmm") == "matmul"
    assert module.kernel_class("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    # FlashAttention 3 on Hopper is a CUTLASS kernel: attention, not matmul (H200, 069763f)
    assert module.kernel_class("void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<") \
        == "attention"
    assert module.kernel_class("void at::native::vectorized_elementwise_kernel<4>") == "other"
    fast = {"ms_per_unit": {"matmul": 1.0, "attention": 0.5, "other": 0.5}, "total_ms_per_unit": 2.0}
    side = {"ms_per_unit": {"matmul": 2.0, "attention": 0.5, "other": 1.5}, "total_ms_per_unit": 4.0}
    assert module.gaps(fast, side) == {"matmul": {"ms": 1.0, "share_of_side": 0.25},
                                       "attention": {"ms": 0.0, "share_of_side": 0.0},
                                       "other": {"ms": 1.0, "share_of_side": 0.25}}
    summary = module.by_class({"matmul_kernel_persistent": {"ms": 6.0, "calls": 3},
                               "flash_fwd": {"ms": 2.0, "calls": 1}, "add": {"ms": 2.0, "calls": 9}}, per=2, top=2)
    assert summary["ms_per_unit"] == {"matmul": 3.0, "attention": 1.0, "other": 1.0}
    assert summary["total_ms_per_unit"] == 5.0 and [k["name"] for k in summary["top"]] == ["matmul_kernel_persistent",
                                                                                          "flash_fwd"]


def test_the_gpu_kernel_checks_say_in_one_line_that_they_need_a_gpu(capsys):
    """The tile-config and split checks run vLLM's Triton GEMM and FlashAttention: without CUDA they stop at once with exit 2."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check runs for real (benchmarks/results/gemm_configs.json)")
    module = bench("gemm_configs")
    with pytest.raises(SystemExit) as stop:
        module.main([])
    assert stop.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err
    assert module.CANDIDATES["small_m"] is module.SMALL_M_CONFIG  # the config small_m=1 runs is the one checked
    assert module.CANDIDATES["large_m"] is module.LARGE_M_CONFIG and 16384 in module.TIMED_ROWS  # the tower's M
    with pytest.raises(SystemExit) as stop:  # the same for the tower FlashAttention's split check
        bench("fa_splits").main([])
    assert stop.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_bench_serve_measures_other_profiles_against_the_same_baseline():
    """--also-profile P: serve under P from its own store, with vLLM's options after `--` kept."""
    module = bench("bench_serve")
    assert module.with_profile(["--profile", "exact", "--", "--api-server-count", "4"], "fast") == \
        ["--profile", "fast", "--", "--api-server-count", "4"]
    assert module.with_profile(["--profile=exact", "--store-new"], "fast") == ["--profile", "fast", "--store-new"]
    assert module.with_profile([], "fast") == ["--profile", "fast"]
    assert module.encode_profile(module.with_profile(["--", "--profile", "x"], "fast")) == ["--profile", "fast"]
    assert module.parse_args(["--model", "m", "--also-profile", "fast"]).also_profile == ["fast"]


def test_kernel_trace_reads_torch_profiler_traces(tmp_path):
    """bench_vs_vllm --kernels reads the trace files vLLM's engine writes (torch.profiler's
    tensorboard handler); without GPU kernels in them it sums CPU ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    module = bench("kernel_trace")
    with profile(activities=[ProfilerActivity.CPU], on_trace_ready=tensorboard_trace_handler(str(tmp_path), use_gzip=True)):
        for _ in range(3):
            torch.mm(torch.randn(64, 64), torch.randn(64, 64))
    totals = module.trace_totals(tmp_path)
    assert totals["timed"] == "cpu_op" and totals["by_name"]["aten::mm"]["calls"] == 3
    summary = module.by_class(totals["by_name"], per=3)
    assert summary["ms_per_unit"]["matmul"] > 0 and summary["top"][0]["ms"] > 0
    assert module.trace_totals(tmp_path / "none") == {"timed": "cpu_op", "by_name": {}}
    args = bench("bench_vs_vllm").parse_args(["--model", "m", "--kernels"])
    assert args.kernels and bench("bench_vs_vllm").profiler({"kernels": None}, "exact") == {}
    assert bench("bench_vs_vllm").profiler({"kernels": "/t"}, "exact")["profiler_config"]["torch_profiler_dir"] == "/t/exact"


def test_bytecode_compiles_the_site_a_package_was_unpacked_into(tmp_path, monkeypatch):
    """The GPU check's first step: an unpacked site (no .pyc) is compiled as pip would at install, and
    what was found is reported; a second call finds nothing left to do."""
    import importlib.util

    from benchmarks.bytecode import compile_site, without_bytecode

    site = tmp_path / "site"
    (site / "unpacked" / "sub").mkdir(parents=True)
    for name in ("unpacked/__init__.py", "unpacked/sub/__init__.py", "unpacked/sub/mod.py", "beside.py"):
        (site / name).write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(site))
    assert without_bytecode(site)[0] == 4 and len(without_bytecode(site)[1]) == 4
    (site / "unpacked" / "broken.py").write_text("def (:\n")  # a file that does not compile is counted, left
    first = compile_site("unpacked")
    assert first["site"] == str(site) and first["without_bytecode"] == 5
    assert first["compiled"] == 4 and first["failed"] == 1
    assert [p.name for p in without_bytecode(site)[1]] == ["broken.py"]
    assert Path(importlib.util.cache_from_source(str(site / "beside.py"))).exists()  # the whole site, as pip's install
    assert compile_site("unpacked")["compiled"] == 0
    assert compile_site("no_such_package_here") == {"package": "no_such_package_here", "installed": False}


def test_free_ports_lie_below_the_kernels_ephemeral_range():
    """Servers in tests and benchmarks take ports nothing else is handed while they start (a Ray worker or
    another vLLM binding port 0 once raced a test server for its port)."""
    from benchmarks.servers import LOWEST_PORT, ephemeral_low, free_port

    low = ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(LOWEST_PORT <= p < low for p in ports) and len(ports) > 1
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
