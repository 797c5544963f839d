"""A tiny random-weight causal LM with a locally trained BPE tokenizer, built offline in about a second.

For plumbing tests only (engine equivalence, injection, capture): the weights are random, so nothing
about the model's *behaviour* may be concluded from it. Two families are covered:

* ``arch="llama"``: ``LlamaForCausalLM`` (no biases, rope_theta 10000);
* ``arch="qwen2"``: ``Qwen2ForCausalLM`` (q/k/v biases, set to random non-zero values; rope_theta 1e6).

The weights are drawn with a larger spread than HF's default (``init_std``) so that attention is not
nearly uniform and the logits are not nearly flat: differences between windows then show clearly.
``head_dim`` must be one vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
BOS_ID, EOS_ID = 1, 2

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Episodic memory segments a stream of tokens into events by surprise.",
    "vLLM is a high-throughput inference engine with paged attention.",
    "Hello world! This is a tiny tokenizer trained offline.",
    "A session streams text of any length; the server keeps every event's keys and values.",
    "Numbers 0123456789, punctuation ,.;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~` and spaces.",
    "Retrieval picks similar and contiguous events; the window stays bounded.",
    "Once upon a time there was a little model that could only count to five hundred and twelve.",
)


def _train_tokenizer(vocab: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab < 256 + len(SPECIAL_TOKENS):
        need = 256 + len(SPECIAL_TOKENS)
        raise ValueError(f"vocab must hold the 256 byte tokens and the specials ({need}), got {vocab}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 20, trainer)
    return tok


def make_tiny_llama(
    out_dir: Path,
    *,
    num_layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 32,
    vocab: int = 512,
    max_pos: int = 4096,
    dtype: str = "float32",
    arch: str = "llama",
    seed: int = 0,
    init_std: float = 0.1,
) -> Path:
    """Write a tiny random model + tokenizer to ``out_dir`` (created) and return it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} is not supported by vLLM CPU attention: {VLLM_CPU_HEAD_DIMS}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(vocab)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(out)

    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        initializer_range=init_std,
        dtype=dtype,
    )
    config: LlamaConfig | Qwen2Config
    model: torch.nn.Module
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        model = LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(
            **common, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, use_sliding_window=False
        )
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(f"unknown arch {arch!r}; use 'llama' or 'qwen2'")

    # HF initialises biases to zero; random ones make the q/k/v bias path observable.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    return out
