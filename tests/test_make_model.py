"""make_model writes a Qwen2-VL checkpoint that transformers and vLLM load offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

EXPECTED_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "splitvlm-model.json",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def test_files_written(tiny_model):
    names = {p.name for p in Path(tiny_model).iterdir()}
    assert set(EXPECTED_FILES) <= names
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert config["text_config"]["max_position_embeddings"] >= 4096


def test_transformers_loads_offline(tiny_model):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_model, local_files_only=True)
    processor = AutoProcessor.from_pretrained(tiny_model, local_files_only=True)
    tokenizer = processor.tokenizer
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert config.text_config.hidden_size == config.vision_config.hidden_size == 128
    assert config.text_config.hidden_size // config.text_config.num_attention_heads == 32
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    assert len(set(ids.values())) == len(SPECIAL)
    assert config.image_token_id == ids["<|image_pad|>"]
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert config.text_config.eos_token_id == ids["<|im_end|>"] == tokenizer.eos_token_id
    assert config.text_config.vocab_size >= len(tokenizer)

    pixels = processor(images=[Image.new("RGB", (100, 60), "red")], text=["<|image_pad|>"])
    assert pixels["image_grid_thw"].tolist() == [[1, 4, 8]]  # 56x112 after smart resize


def test_chat_template_formats(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model, local_files_only=True)
    content = [
        {"type": "image"},
        {"type": "image_url", "image_url": {"url": "file:///x.png"}},
        {"type": "text", "text": "Compare them. 这是什么？"},
    ]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert text.endswith("Compare them. 这是什么？<|im_end|>\n<|im_start|>assistant\n")
    plain = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n" in plain
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE round-trips, Chinese included


def test_vllm_generates_text(engine):
    tokenizer = engine.tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    image = Image.new("RGB", (120, 90), (10, 200, 90))
    (out,) = engine.generate([{"prompt": text, "multi_modal_data": {"image": image}}], engine.sampling_params(max_tokens=8))
    assert len(out.outputs[0].token_ids) == 8
    assert out.outputs[0].text


def test_2b_config_numbers():
    from splitvlm.tools.make_model import build_config

    config = build_config("qwen2-vl-2b")
    text, vision = config.text_config, config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (28, 1536, 8960)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (12, 2, 151936)
    assert text.rope_parameters["rope_theta"] == 1e6
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert config.tie_word_embeddings is True
    assert (vision.depth, vision.embed_dim, vision.num_heads, vision.mlp_ratio) == (32, 1280, 16, 4)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert vision.hidden_size == 1536
    assert config.architectures == ["Qwen2VLForConditionalGeneration"]
    assert config.image_token_id < text.vocab_size


def test_unknown_arch_is_refused(tmp_path):
    from splitvlm.core.errors import SplitVLMError
    from splitvlm.tools.make_model import make_model

    with pytest.raises(SplitVLMError, match="unknown arch"):
        make_model("qwen9", str(tmp_path / "m"))


def test_cli_writes_and_refuses_foreign_dir(tmp_path):
    from splitvlm.cli.main import cli

    runner = CliRunner()
    out = tmp_path / "tiny"
    result = runner.invoke(cli, ["make-model", "--arch", "tiny", "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output and "parameters" in result.output
    assert (out / "model.safetensors").is_file()
    again = runner.invoke(cli, ["make-model", "--out", str(out)])  # its own output: may overwrite
    assert again.exit_code == 0, again.output

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = runner.invoke(cli, ["make-model", "--out", str(foreign)])
    assert refused.exit_code != 0
    assert "not empty" in refused.output
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.gpu
def test_2b_builds_on_gpu(tmp_path):
    from safetensors import safe_open

    from splitvlm.tools.make_model import make_model, read_marker

    out = make_model("qwen2-vl-2b", str(tmp_path / "2b"), device="cuda")
    info = read_marker(out)
    assert info is not None and 2.0e9 < info["parameters"] < 2.5e9
    with safe_open(str(Path(out) / "model.safetensors"), "pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in list(weights.keys())[:20]}
    assert dtypes == {"BF16"}
