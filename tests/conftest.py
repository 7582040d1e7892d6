"""Shared tiny models. Sizes are small enough for CPU but keep the real architecture."""
from __future__ import annotations

import pytest
import torch

from xcomposer import InternLMConfig, InternLMForCausalLM

VOCAB = 1000


def tiny_config(**kw) -> InternLMConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256)
    base.update(kw)
    return InternLMConfig(**base)


def tiny_model(seed: int = 0, std: float = 0.2, **kw) -> InternLMForCausalLM:
    g = torch.Generator().manual_seed(seed)
    m = InternLMForCausalLM(tiny_config(**kw)).eval()
    m.init_weights(std=std, generator=g)  # a large std gives peaked, decisive logits
    return m


def hf_twin(model: InternLMForCausalLM):
    """transformers' Llama with attention biases: InternLM v1's math, code we did not write."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_attention_heads, max_position_embeddings=c.max_position_embeddings,
                     rms_norm_eps=c.rms_norm_eps, attention_bias=True, rope_theta=c.rope_base,
                     tie_word_embeddings=c.tie_word_embeddings, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = LlamaForCausalLM(hc).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


# the decoder as the loaders leave it (fused, transposed on CPU), the plain upstream layout, and
# the fused decoder running the fixed-shape decode step of xcomposer.llm.fast_decode (on CPU that
# step runs eagerly: the same math a CUDA graph replays)
DECODER_VARIANTS = ["plain", "fused", "fused+static"]


def apply_variant(m: InternLMForCausalLM, variant: str) -> InternLMForCausalLM:
    from xcomposer.llm.fast_decode import use_cuda_graphs
    if variant != "plain":
        m.fuse_projections()
    if variant == "fused+static":
        use_cuda_graphs(m)
    return m


@pytest.fixture(scope="module", params=DECODER_VARIANTS)
def pair(request):
    """(our tiny decoder in one of DECODER_VARIANTS, transformers' twin with the same weights)."""
    m = tiny_model()
    hf = hf_twin(m)
    return apply_variant(m, request.param), hf
