"""Shared helpers for the InternLM2 tests: tiny GQA decoders and their transformers twins.

The twin is transformers' `LlamaForCausalLM(num_key_value_heads=...)`, code nobody here wrote,
loaded with our upstream-layout state dict converted by `to_llama` below, which follows the facts
of docs/checkpoint-format.md (and InternLM's tools/convert2llama.py) written out head by head,
without our `split_wqkv`.
"""
from __future__ import annotations

import inspect

import torch

from xcomposer.llm.config import InternLM2Config
from xcomposer.llm.decoder import InternLMForCausalLM

VOCAB = 1000
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=1000000.0, rope_scaling=None,
             torch_dtype="float32", eos_token_id=2, pad_token_id=2)


def tiny2_config(**kw) -> InternLM2Config:
    return InternLM2Config(**{**SHAPE, **kw})


def tiny2_model(seed: int = 0, std: float = 0.2, **kw) -> InternLMForCausalLM:
    m = InternLMForCausalLM(tiny2_config(**kw)).eval()
    m.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    return m


_RENAMES = [("attention.wo", "self_attn.o_proj"), ("feed_forward.w1", "mlp.gate_proj"),
            ("feed_forward.w3", "mlp.up_proj"), ("feed_forward.w2", "mlp.down_proj"),
            ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
            ("model.tok_embeddings", "model.embed_tokens")]


def to_llama(upstream: dict, cfg: InternLM2Config) -> dict:
    """InternLM2 upstream keys -> Llama keys. `wqkv` rows per kv head h: g query heads, k_h, v_h."""
    d, kv = cfg.head_dim, cfg.num_key_value_heads
    g = cfg.num_attention_heads // kv
    out = {}
    for key, t in upstream.items():
        if key.endswith("attention.wqkv.weight"):
            q, k, v = [], [], []
            for h in range(kv):
                block = t[h * (g + 2) * d:(h + 1) * (g + 2) * d]
                q += [block[j * d:(j + 1) * d] for j in range(g)]
                k.append(block[g * d:(g + 1) * d])
                v.append(block[(g + 1) * d:(g + 2) * d])
            stem = key[: -len("attention.wqkv.weight")] + "self_attn."
            out[stem + "q_proj.weight"] = torch.cat(q)
            out[stem + "k_proj.weight"] = torch.cat(k)
            out[stem + "v_proj.weight"] = torch.cat(v)
            continue
        name = "lm_head.weight" if key == "output.weight" else key
        for a, b in _RENAMES:
            name = name.replace(a, b)
        out[name] = t
    return out


def hf_llama(cfg: InternLM2Config, state: dict):
    """transformers' Llama with the same GQA shape, rope and (converted) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
              num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
              rms_norm_eps=cfg.rms_norm_eps, attention_bias=False, tie_word_embeddings=cfg.tie_word_embeddings,
              pad_token_id=2, bos_token_id=1, eos_token_id=2)
    rope = {"rope_type": cfg.rope_scaling_type or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope["factor"] = cfg.rope_scaling_factor
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers >= 5
        kw["rope_parameters"] = rope
    else:  # older transformers: rope_theta + rope_scaling
        kw["rope_theta"] = cfg.rope_theta
        kw["rope_scaling"] = None if cfg.rope_scaling is None else {"rope_type": rope["rope_type"],
                                                                   "factor": rope["factor"]}
    hf = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    missing, unexpected = hf.load_state_dict(to_llama(state, cfg), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


def reset_hf_rope(hf) -> None:
    """transformers' dynamic rope only grows its cached length between calls (a shorter call past
    the window keeps the larger base of an earlier, longer one); start each comparison fresh."""
    rot = hf.model.rotary_emb
    if hasattr(rot, "original_inv_freq"):
        rot.register_buffer("inv_freq", rot.original_inv_freq.clone(), persistent=False)
        rot.max_seq_len_cached = rot.original_max_seq_len


def hf_generate(hf, prompts, stop, **kw):
    """transformers on a left-padded batch; the generated part of each row."""
    reset_hf_rope(hf)
    T = max(map(len, prompts))
    ids = torch.tensor([[2] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=stop, pad_token_id=2, **kw)
    return out[:, T:].tolist()


def same_as_hf(ours_rows, hf_rows, stop, pad=2):
    fill = {pad} | ({stop[0]} if stop else set())
    return all(h[: len(o)] == o and set(h[len(o):]) <= fill for o, h in zip(ours_rows, hf_rows))
