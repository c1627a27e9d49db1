"""splitvlm's vLLM general plugin: vLLM loads it in its own processes, driven by one variable."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from splitvlm.core import engine as engine_module
from splitvlm.core.errors import SplitVLMError
from splitvlm.core.profiles import ProcessSettings, get_profile, settings_from


def test_settings_round_trip_and_overrides():
    exact = get_profile("exact").settings()
    assert settings_from(exact.value()) == exact == ProcessSettings("exact", "batched", True)
    assert settings_from("exact") == exact
    assert settings_from("fast") == ProcessSettings("fast", "batched", False)
    assert settings_from("exact;vision=per_image;invariant_matmul=0") == ProcessSettings("exact", "per_image", False)
    assert settings_from(None) == settings_from("") == ProcessSettings()  # plain vLLM: no kernels changed


@pytest.mark.parametrize("value", ["exact;colour=red", "exact;vision=sideways", "nonsense", "exact;vision"])
def test_bad_settings_are_one_line_errors(value):
    with pytest.raises(SplitVLMError) as err:
        settings_from(value)
    assert "\n" not in str(err.value)


def test_profile_env_holds_one_splitvlm_variable():
    for gpu in (False, True):
        env = get_profile("exact").env(gpu)
        assert [k for k in env if k.startswith("SPLITVLM_")] == ["SPLITVLM_PROFILE"]


def test_exact_cpu_processes_cap_onednn_isa():
    """oneDNN rounds differently with and without AMX, and a process can lose AMX silently: the exact
    profile caps every CPU process at AVX-512 BF16 (tests/test_ray_encode.py shows a refused process)."""
    from splitvlm.core.profiles import EXACT_CPU_ISA

    assert get_profile("exact").env(gpu=False)[EXACT_CPU_ISA[0]] == EXACT_CPU_ISA[1]
    assert EXACT_CPU_ISA[0] not in get_profile("exact").env(gpu=True)
    assert EXACT_CPU_ISA[0] not in get_profile("fast").env(gpu=False)


def test_exact_gpu_engines_pick_the_same_kernels_eager_or_compiled():
    """vLLM picks custom ops and RMSNorm's kernel by compilation mode; the exact profile pins both, so
    the eager encoder-only engine and the compiled decoder compute the tower alike (Qwen2.5-VL's
    tower uses RMSNorm: 0/264 embeddings equal on the H200 at f8f6060 without the pin)."""
    from vllm.engine.arg_utils import EngineArgs

    kwargs = get_profile("exact").engine_kwargs(gpu=True)
    # every custom op off but the tower's attention, which off would be per-image SDPA whatever its
    # backend, and QuickGELU (a default lever on a GPU: vLLM's CUDA kernel in both engines)
    assert kwargs["compilation_config"] == {"custom_ops": ["none", "+mm_encoder_attn", "+quick_gelu"]}
    assert kwargs["mm_encoder_attn_backend"] == "FLASH_ATTN"
    assert get_profile("exact").engine_kwargs(gpu=False)["mm_encoder_attn_backend"] == "TORCH_SDPA"
    assert kwargs["ir_op_priority"] == {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]}
    assert "ir_op_priority" in EngineArgs.__dataclass_fields__  # a real engine argument of this vLLM
    assert "ir_op_priority" not in get_profile("exact").engine_kwargs(gpu=False)  # the CPU runs eager only
    assert "ir_op_priority" not in get_profile("fast").engine_kwargs(gpu=True)  # fast: vLLM's defaults


def test_the_towers_flash_attention_runs_with_one_split():
    """vLLM's ViT wrapper passes no num_splits, so FA3 would pick the split count from the call's size;
    the plugin fixes it at 1 in the module the wrapper reads it from at each call, once, whatever else
    the caller passes."""
    import types

    from splitvlm.core.invariance import single_split_flash_attention

    calls = []
    module = types.SimpleNamespace(flash_attn_varlen_func=lambda *a, **k: calls.append((a, k)) or "out")
    assert single_split_flash_attention(module) and single_split_flash_attention(module)  # idempotent
    assert module.flash_attn_varlen_func("q", "k", "v", causal=False) == "out"
    assert module.flash_attn_varlen_func("q", "k", "v", num_splits=0) == "out"
    assert calls == [(("q", "k", "v"), {"causal": False, "num_splits": 1}), (("q", "k", "v"), {"num_splits": 1})]
    assert not single_split_flash_attention(types.SimpleNamespace())  # no FlashAttention: nothing to do
    if importlib.util.find_spec("vllm.v1.attention.ops.vit_attn_wrappers"):  # vLLM still reads it per call
        wrappers = Path(importlib.util.find_spec("vllm.v1.attention.ops.vit_attn_wrappers").origin).read_text()
        assert "from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func" in wrappers


def test_a_variable_naming_another_profile_is_refused(monkeypatch):
    monkeypatch.setattr(engine_module, "_process_env", None)
    monkeypatch.setenv("SPLITVLM_PROFILE", "fast")
    with pytest.raises(SplitVLMError, match="another profile"):
        engine_module._prepare_process(get_profile("exact"), gpu=False)


def _python(code: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_vllm_loads_the_plugin_without_splitvlm_being_imported():
    """vLLM's own plugin loader finds the entry point (pyproject's vllm.general_plugins)."""
    code = """
        import sys
        from vllm.plugins import load_general_plugins
        from vllm import ModelRegistry
        archs = ("SplitVLMQwen2VL", "SplitVLMQwen2_5VL", "SplitVLMQwen3VL")
        assert not set(archs) & set(ModelRegistry.get_supported_archs())
        load_general_plugins()
        assert set(archs) <= set(ModelRegistry.get_supported_archs())
        print("ok")
    """
    out = _python(code, {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_a_multiprocess_engine_builds_splitvlms_model_in_its_engine_process(tiny_model, engine):
    """Plain vLLM, engine core in its own process (vLLM's default), asked for splitvlm's
    architecture: only the plugin can have registered it there. The output must equal the
    greedy output of splitvlm's own engine (this session's, in this process) for the same text prompt."""
    code = f"""
        import json, os
        from vllm import LLM, SamplingParams
        llm = LLM(model={tiny_model!r}, hf_overrides={{"architectures": ["SplitVLMQwen2VL"]}},
                  max_model_len=512, enforce_eager=True, enable_prefix_caching=False, seed=0)
        archs = llm.llm_engine.model_config.architectures
        out = llm.generate(["a red square"], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
        print(json.dumps({{"archs": archs, "ids": list(out[0].outputs[0].token_ids), "pid": os.getpid()}}))
    """
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "SPLITVLM_PROFILE": "exact",
           "VLLM_LOGGING_LEVEL": "ERROR", "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = _python(code, env)
    assert out.returncode == 0, out.stderr[-3000:]
    multi = json.loads(out.stdout.strip().splitlines()[-1])
    assert multi["archs"] == ["SplitVLMQwen2VL"] and len(multi["ids"]) == 8
    here = engine.generate([{"prompt": "a red square"}], engine.sampling_params(8))
    assert list(here[0].outputs[0].token_ids) == multi["ids"]


@pytest.mark.slow
def test_decode_with_the_engine_core_in_its_own_process_gives_the_same_bytes(tiny_model, engine, tmp_path):
    """`decode --engine-process separate` (vLLM's default layout, which the plugin makes possible)
    against the in-process engine, on stored embeddings of real images: same token ids and text."""
    from helpers import config, write_jobs

    from splitvlm.decoder import Decoder, read_jobs
    from splitvlm.encoder import Encoder
    from splitvlm.tools.samples import save_corpus

    images = save_corpus(tmp_path / "imgs", 4, seed=11, sizes=[(64, 64), (96, 80), (120, 72)])
    cfg = config(tiny_model, tmp_path / "store", max_tokens=12)
    Encoder(cfg, engine=engine).encode(images)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": f"j{n}", "images": [images[n % 4]], "prompt": f"What is {n}?"}
                                                for n in range(8)])
    here = {r.id: (r.token_ids, r.text) for r in Decoder(cfg, engine=engine).generate(read_jobs(jobs))}
    out = tmp_path / "separate.jsonl"
    cmd = [sys.executable, "-m", "splitvlm.cli.main", "decode", "--model", tiny_model, "--store", cfg.store,
           "--jobs", jobs, "--out", str(out), "--max-tokens", "12", "--max-model-len", "2048",
           "--engine-process", "separate", "--stats-json", str(tmp_path / "stats.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["engine"]["multiprocessing"] == "1"
    there = {r["id"]: (r["token_ids"], r["text"]) for r in map(json.loads, out.read_text().splitlines())}
    assert there == here and all(len(ids) > 0 for ids, _ in here.values())


def test_where_the_engine_core_runs(tiny_model):
    from splitvlm.core.config import Config
    from splitvlm.core.engine import separate_process

    cfg = Config(model=tiny_model, engine_process="separate")
    assert separate_process(cfg, gpu=False, encoder_only=False, model_access=False)
    assert not separate_process(cfg, gpu=False, encoder_only=False, model_access=True)
    assert not separate_process(cfg, gpu=True, encoder_only=True, model_access=False)
    auto = cfg.replace(engine_process="auto")
    assert separate_process(auto, gpu=True, encoder_only=False, model_access=False)
    assert not separate_process(auto, gpu=False, encoder_only=False, model_access=False)
    with pytest.raises(SplitVLMError, match="engine-process"):
        separate_process(cfg.replace(engine_process="elsewhere"), gpu=False, encoder_only=False, model_access=False)


def test_the_engine_reports_how_its_towers_attention_runs(engine):
    """Asked-for and run can differ (a custom op turned off runs per-image SDPA whatever backend was
    asked for), so the report reads the built model: on the CPU, vLLM's CPU path with SDPA."""
    method, backend = engine.reported()["vision_attention"].split()
    assert method in ("forward_cpu", "forward_native") and backend == "TORCH_SDPA"


def test_the_tower_levers_are_on_by_default_on_a_gpu_only():
    """fused_bias=1 puts the linear layers' bias inside the batch-invariant GEMM, quick_gelu=1 runs vLLM's
    CUDA QuickGELU: on by default under exact on a GPU (every exactness check of the GPU check passed
    under them at fb75764), named in the value so that result-cache keys change with them; on the CPU
    the value is as before."""
    from splitvlm.core.profiles import EXACT_GPU_LEVERS

    assert get_profile("exact").settings().value() == "exact;vision=batched;invariant_matmul=1"
    gpu = get_profile("exact").settings(gpu=True)
    assert gpu.fused_bias and gpu.quick_gelu and not gpu.small_m and EXACT_GPU_LEVERS == ("fused_bias", "quick_gelu")
    assert gpu.value() == "exact;vision=batched;invariant_matmul=1;fused_bias=1;quick_gelu=1"
    assert settings_from(gpu.value()) == gpu  # the value names every lever that is on
    assert get_profile("exact").env(gpu=True)["SPLITVLM_PROFILE"] == gpu.value()
    assert get_profile("exact").env(gpu=False)["SPLITVLM_PROFILE"] == "exact;vision=batched;invariant_matmul=1"
    assert get_profile("fast").settings(gpu=True) == settings_from("fast")  # fast: vLLM's defaults, no levers
    assert not settings_from("exact").fused_bias  # a value without a lever runs without it
    both = settings_from("exact;small_m=1;fused_bias=1")
    assert both.small_m and both.fused_bias and settings_from(both.value()) == both
    with pytest.raises(SplitVLMError, match="fused_bias=0"):
        settings_from("exact;fused=1")


def test_entries_record_the_levers_that_change_the_towers_bits(monkeypatch):
    """An entry encoded under an experiment lever records it, so an engine without it refuses the entry."""
    from splitvlm.core.profiles import tower_kernels

    monkeypatch.delenv("SPLITVLM_PROFILE", raising=False)
    assert tower_kernels("exact", gpu=True) == "flash-attn-varlen-splits1+fused_bias+quick_gelu"
    assert tower_kernels("exact", gpu=False) == "sdpa-per-image" and tower_kernels("fast", gpu=True) == "vllm-default"
    monkeypatch.setenv("SPLITVLM_PROFILE", "exact;fused_bias=1;small_m=1")
    assert tower_kernels("exact", gpu=True) == "flash-attn-varlen-splits1+fused_bias+small_m"
    assert tower_kernels("exact", gpu=False) == "sdpa-per-image"  # the levers act on the GPU only
    assert tower_kernels("fast", gpu=True) == "vllm-default"  # the variable names another profile
    monkeypatch.setenv("SPLITVLM_PROFILE", "exact;quick_gelu=1")
    assert tower_kernels("exact", gpu=True) == "flash-attn-varlen-splits1+quick_gelu"
    monkeypatch.setenv("SPLITVLM_PROFILE", "exact")  # the exact GPU tower before 2026-12-01
    assert tower_kernels("exact", gpu=True) == "flash-attn-varlen-splits1"


def test_the_quick_gelu_lever_turns_on_vllms_cuda_quick_gelu_for_every_engine(monkeypatch):
    """quick_gelu=1 keeps vLLM's QuickGELU custom op on, for the encoder and the decoder alike (the pin
    that keeps eager and compiled engines equal), and only on a GPU under exact (there by default)."""
    from splitvlm.core.config import Config
    from splitvlm.core.engine import engine_args

    lever = settings_from("exact;quick_gelu=1")
    assert lever.quick_gelu and settings_from(lever.value()) == lever and lever.value().endswith(";quick_gelu=1")
    ops = get_profile("exact").engine_kwargs(gpu=True, settings=lever)["compilation_config"]["custom_ops"]
    assert ops == ["none", "+mm_encoder_attn", "+quick_gelu"]
    assert "compilation_config" not in get_profile("exact").engine_kwargs(gpu=False, settings=lever)
    monkeypatch.setenv("SPLITVLM_PROFILE", "exact;quick_gelu=1")
    for encoder_only in (True, False):
        kwargs = engine_args(Config(model="m", profile="exact"), "Arch", True, encoder_only=encoder_only)
        assert kwargs["compilation_config"]["custom_ops"][-1] == "+quick_gelu"
    monkeypatch.setenv("SPLITVLM_PROFILE", "exact")  # a value without the lever
    assert engine_args(Config(model="m", profile="exact"), "Arch", True)["compilation_config"] == \
        {"custom_ops": ["none", "+mm_encoder_attn"]}
    monkeypatch.delenv("SPLITVLM_PROFILE")  # the profile's own: on by default on a GPU, never on the CPU
    assert engine_args(Config(model="m", profile="exact"), "Arch", True)["compilation_config"]["custom_ops"][-1] == \
        "+quick_gelu"
    assert "compilation_config" not in engine_args(Config(model="m", profile="exact"), "Arch", False)


def test_the_linear_levers_change_only_what_they_are_asked_to():
    """fused_bias: the bias inside the one GEMM over all rows; small_m: the small tile for few rows only,
    with vLLM's separate bias add kept; neither: vLLM's own linear_batch_invariant untouched."""
    import types

    import torch

    from splitvlm.core.invariant_linear import SMALL_M, SMALL_M_CONFIG, invariant_linear

    calls = []

    def matmul_persistent(a, b, bias=None):
        calls.append(("vllm tile", tuple(a.shape), bias is not None))
        return a @ b + (bias if bias is not None else 0)

    def vllms(x, w, b=None):
        calls.append(("vllm linear", tuple(x.shape), b is not None))
        return x @ w.t() + (b if b is not None else 0)

    kernels = types.SimpleNamespace(matmul_persistent=matmul_persistent)
    assert not invariant_linear(types.SimpleNamespace(linear_batch_invariant=vllms), kernels)  # nothing asked
    fused = types.SimpleNamespace(linear_batch_invariant=vllms)
    assert invariant_linear(fused, kernels, fused_bias=True) and invariant_linear(fused, kernels, fused_bias=True)
    x, w, b = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(5)
    out = fused.linear_batch_invariant(x, w, b)
    assert out.shape == (2, 3, 5) and torch.allclose(out, x @ w.t() + b, atol=1e-5)
    assert fused.linear_batch_invariant(x, w).shape == (2, 3, 5)
    assert calls == [("vllm tile", (6, 4), True), ("vllm linear", (2, 3, 4), False)]

    calls.clear()
    small = types.SimpleNamespace(linear_batch_invariant=vllms)
    launched = []
    import splitvlm.core.invariant_linear as module

    def fake_gemm(kernels, a, b, bias=None, config=None):
        launched.append((tuple(a.shape), bias is not None, config))
        return a @ b + (bias if bias is not None else 0)

    real, module.persistent_gemm = module.persistent_gemm, fake_gemm
    try:
        assert invariant_linear(small, kernels, small_m=True)
        few, many = torch.randn(SMALL_M, 4), torch.randn(SMALL_M + 1, 4)
        assert torch.allclose(small.linear_batch_invariant(few, w, b), few @ w.t() + b, atol=1e-5)
        small.linear_batch_invariant(many, w, b)
    finally:
        module.persistent_gemm = real
    assert launched == [((SMALL_M, 4), False, SMALL_M_CONFIG)]  # the bias added after it, as vLLM does
    assert calls == [("vllm linear", (SMALL_M + 1, 4), True)]  # many rows: vLLM's own, untouched
    assert not invariant_linear(types.SimpleNamespace(), kernels, fused_bias=True)


def test_the_tile_levers_pick_a_tile_by_the_gemms_rows(monkeypatch):
    """small_m: the small tile up to SMALL_M rows; large_m: the wide tile from LARGE_M rows (the tower's
    batches); between them, or without the lever, vLLM's own tile. large_m is recorded like every lever."""
    import types

    import torch

    import splitvlm.core.invariant_linear as module
    from splitvlm.core.invariant_linear import (
        LARGE_M,
        LARGE_M_CONFIG,
        SMALL_M,
        SMALL_M_CONFIG,
        tile_for,
    )
    from splitvlm.core.profiles import tower_kernels

    assert tile_for(SMALL_M, small_m=True) is SMALL_M_CONFIG and tile_for(SMALL_M, large_m=True) is None
    assert tile_for(LARGE_M, large_m=True) is LARGE_M_CONFIG and tile_for(LARGE_M - 1, True, True) is None
    assert tile_for(LARGE_M, small_m=True) is None and tile_for(1) is None
    assert LARGE_M_CONFIG["BLOCK_SIZE_K"] == SMALL_M_CONFIG["BLOCK_SIZE_K"] == 64  # vLLM's K step
    launched = []

    def fake_gemm(kernels, a, b, bias=None, config=None):
        launched.append((a.shape[0], bias is not None, config))
        return a @ b + (bias if bias is not None else 0)

    monkeypatch.setattr(module, "persistent_gemm", fake_gemm)
    vllms = types.SimpleNamespace(linear_batch_invariant=lambda x, w, b=None: x @ w.t() + (b if b is not None else 0))
    assert module.invariant_linear(vllms, types.SimpleNamespace(), large_m=True)
    w, b = torch.randn(5, 4), torch.randn(5)
    many = torch.randn(LARGE_M, 4)
    assert torch.allclose(vllms.linear_batch_invariant(many, w, b), many @ w.t() + b, atol=1e-5)
    vllms.linear_batch_invariant(torch.randn(8, 4), w, b)  # few rows: vLLM's own
    assert launched == [(LARGE_M, False, LARGE_M_CONFIG)]  # the bias added after, as vLLM does
    monkeypatch.setenv("SPLITVLM_PROFILE", "exact;large_m=1")
    assert tower_kernels("exact", gpu=True) == "flash-attn-varlen-splits1+large_m"
    assert settings_from("exact;large_m=1").value().endswith(";large_m=1")
