"""Tiny checkpoints in the exact upstream layouts, for tests, examples and demo mode.

The model is random (its output is noise) but everything else is real: the config.json field
names, sharded `.bin` or `.safetensors` with their index, a trained sentencepiece
`tokenizer.model` with InternLM's special pieces, and the derivable `rotary_emb.inv_freq`
buffers that real shards carry.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .config import InternLMConfig
from .decoder import InternLMForCausalLM
from .tokenizer import load_tokenizer, train_tiny_tokenizer

TINY_SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512)


def tiny_internlm_config(vocab_size: int, **overrides) -> InternLMConfig:
    return InternLMConfig(**{**TINY_SHAPE, "vocab_size": vocab_size, "torch_dtype": "float32", **overrides})


def upstream_config_dict(cfg: InternLMConfig) -> dict:
    """config.json as the internlm-chat-7b repository writes it (remote-code fields included)."""
    d = cfg.to_dict()
    d.setdefault("auto_map", {
        "AutoConfig": "configuration_internlm.InternLMConfig",
        "AutoModel": "modeling_internlm.InternLMForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM",
    })
    d.setdefault("initializer_range", 0.02)
    d.setdefault("use_cache", True)
    d.setdefault("transformers_version", "4.33.2")
    return d


def write_tiny_internlm(folder: str | Path, *, fmt: str = "safetensors", max_shard_bytes: int = 200_000,
                        seed: int = 0, std: float = 0.2, vocab_size: int = 1000, **overrides) -> Path:
    """Write a random tiny InternLM chat checkpoint to `folder` and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_tiny_tokenizer(folder / "tokenizer.model", vocab_size=vocab_size)
    tok = load_tokenizer(folder)
    cfg = tiny_internlm_config(tok.vocab_size, **overrides)
    model = InternLMForCausalLM(cfg)
    model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    state = dict(model.state_dict())
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    for i in range(cfg.num_hidden_layers):  # real shards carry this derivable buffer; loaders must skip it
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    save_checkpoint(state, folder, fmt=fmt, max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(upstream_config_dict(cfg), indent=2), encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id},
        indent=2), encoding="utf-8")
    return folder
