"""Perceive sampler: parity with transformers' Blip2QFormerModel, output layout, key map, meta build."""
from __future__ import annotations

import re

import pytest
import torch

from projector import (PerceiveSampler, SamplerConfig, init_sampler_weights, sampler_key_map,
                       sampler_to_checkpoint, to_blip2_qformer)

TINY = dict(num_query_token=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
            cross_attention_freq=2, encoder_width=48, llm_hidden_size=40)
N_TOKENS = 17


def tiny_sampler(seed: int = 0, std: float = 0.2) -> PerceiveSampler:
    s = PerceiveSampler(SamplerConfig(**TINY)).eval()
    return init_sampler_weights(s, torch.Generator().manual_seed(seed), std=std)


def features(b: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, N_TOKENS, TINY["encoder_width"], generator=torch.Generator().manual_seed(seed))


def upstream_shapes(c: SamplerConfig, position_ids: bool = True) -> dict[str, tuple]:
    """The sampler's upstream checkpoint names and shapes, written from the XComposer key list."""
    h, e, m = c.hidden_size, c.encoder_width, c.intermediate_size
    out = {"query_tokens": (1, c.num_query_token, h),
           "Qformer.bert.embeddings.LayerNorm.weight": (h,), "Qformer.bert.embeddings.LayerNorm.bias": (h,)}
    if position_ids:
        out["Qformer.bert.embeddings.position_ids"] = (1, 512)
    for i in range(c.num_hidden_layers):
        L = f"Qformer.bert.encoder.layer.{i}"
        blocks = [("attention", h)] + ([("crossattention", e)] if i % c.cross_attention_freq == 0 else [])
        for name, kv in blocks:
            out.update({f"{L}.{name}.self.query.weight": (h, h), f"{L}.{name}.self.query.bias": (h,),
                        f"{L}.{name}.self.key.weight": (h, kv), f"{L}.{name}.self.key.bias": (h,),
                        f"{L}.{name}.self.value.weight": (h, kv), f"{L}.{name}.self.value.bias": (h,),
                        f"{L}.{name}.output.dense.weight": (h, h), f"{L}.{name}.output.dense.bias": (h,),
                        f"{L}.{name}.output.LayerNorm.weight": (h,), f"{L}.{name}.output.LayerNorm.bias": (h,)})
        out.update({f"{L}.intermediate_query.dense.weight": (m, h), f"{L}.intermediate_query.dense.bias": (m,),
                    f"{L}.output_query.dense.weight": (h, m), f"{L}.output_query.dense.bias": (h,),
                    f"{L}.output_query.LayerNorm.weight": (h,), f"{L}.output_query.LayerNorm.bias": (h,)})
    out.update({"internlm_proj.weight": (c.llm_hidden_size, h), "internlm_proj.bias": (c.llm_hidden_size,),
                "flag_image_start": (1, 1, c.llm_hidden_size), "flag_image_end": (1, 1, c.llm_hidden_size)})
    return out


def random_upstream(c: SamplerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in upstream_shapes(c).items():
        if k.endswith("position_ids"):
            sd[k] = torch.arange(512).unsqueeze(0)
        elif k.endswith("LayerNorm.weight"):
            sd[k] = 1 + 0.2 * torch.randn(s, generator=g)
        else:
            sd[k] = 0.2 * torch.randn(s, generator=g)
    return sd


def hf_name(upstream: str) -> str | None:
    """transformers' Blip2QFormerModel name for an upstream Q-Former key (written independently of
    projector.sampler's tables); None for tensors that are not in Blip2QFormerModel."""
    if not upstream.startswith("Qformer.bert.") or upstream.endswith("position_ids"):
        return None
    k = upstream[len("Qformer.bert."):]
    k = k.replace("embeddings.LayerNorm", "layernorm")
    return re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", k)


def hf_reference(sampler: PerceiveSampler, feats: torch.Tensor, model=None) -> torch.Tensor:
    model = model or to_blip2_qformer(sampler)
    b = feats.shape[0]
    with torch.no_grad():
        return model(query_embeds=sampler.query_tokens.expand(b, -1, -1), encoder_hidden_states=feats,
                     encoder_attention_mask=torch.ones(b, feats.shape[1], dtype=torch.long)).last_hidden_state


# -----------------------------------------------------------------------------

def test_config():
    c = SamplerConfig()
    assert c.tokens_per_image == 66
    assert SamplerConfig.from_dict({**c.to_dict(), "vision": {"x": 1}}) == c
    assert [c.has_cross_attention(i) for i in range(4)] == [True, False, True, False]


@pytest.mark.parametrize("batch", [1, 3])
def test_queries_match_transformers_blip2_qformer(batch):
    s = tiny_sampler()
    f = features(batch)
    with torch.no_grad():
        ours = s.queries(f)
    assert ours.shape == (batch, 8, 32)
    assert (ours - hf_reference(s, f)).abs().max() < 1e-5


@pytest.mark.parametrize("batch", [1, 3])
def test_queries_match_blip2_loaded_by_hand_from_upstream_layout(batch):
    """Upstream-layout tensors -> ours via sampler_key_map, and -> transformers (eager attention)
    via this file's own renaming; both must agree."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    c = SamplerConfig(**TINY)
    up = random_upstream(c, seed=batch)
    ours = PerceiveSampler(c).eval()
    mapped = {sampler_key_map(k): v for k, v in up.items() if sampler_key_map(k) is not None}
    ours.load_state_dict(mapped, strict=True)

    hc = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=48, cross_attention_frequency=2, layer_norm_eps=1e-12)
    hc._attn_implementation = "eager"
    hf = Blip2QFormerModel(hc).eval()
    hf_sd = {hf_name(k): v for k, v in up.items() if hf_name(k) is not None}
    hf.load_state_dict(hf_sd, strict=True)

    f = features(batch, seed=10 + batch)
    b = f.shape[0]
    with torch.no_grad():
        ref = hf(query_embeds=up["query_tokens"].expand(b, -1, -1), encoder_hidden_states=f,
                 encoder_attention_mask=torch.ones(b, N_TOKENS, dtype=torch.long)).last_hidden_state
        got = ours.queries(f)
        full = ours(f)
    assert (got - ref).abs().max() < 1e-5
    proj = ref @ up["internlm_proj.weight"].T + up["internlm_proj.bias"]
    assert (full[:, 1:-1] - proj).abs().max() < 1e-5


def test_forward_layout_and_flags():
    s = tiny_sampler()
    f = features(3)
    with torch.no_grad():
        out = s(f)
        q = s.queries(f)
    assert out.shape == (3, 8 + 2, 40) == (3, s.config.tokens_per_image, s.config.llm_hidden_size)
    for b in range(3):
        assert torch.equal(out[b, 0], s.flag_image_start[0, 0])
        assert torch.equal(out[b, -1], s.flag_image_end[0, 0])
    assert torch.allclose(out[:, 1:-1], s.internlm_proj(q))


def test_batch_rows_are_independent():
    s = tiny_sampler()
    f = features(3)
    with torch.no_grad():
        all3 = s(f)
        one = s(f[1:2])
    assert (all3[1:2] - one).abs().max() < 1e-6


def test_key_map_roundtrip_with_upstream_list():
    c = SamplerConfig(**TINY)
    s = PerceiveSampler(c)
    our = set(s.state_dict())
    up = upstream_shapes(c)
    assert sampler_key_map("Qformer.bert.embeddings.position_ids") is None
    mapped = {k: sampler_key_map(k) for k in up}
    kept = [v for v in mapped.values() if v is not None]
    assert [k for k, v in mapped.items() if v is None] == ["Qformer.bert.embeddings.position_ids"]
    assert len(set(kept)) == len(kept) and set(kept) == our
    for k, v in mapped.items():
        if v is not None:
            assert sampler_to_checkpoint(v) == k
            assert tuple(s.state_dict()[v].shape) == up[k], k
    assert {sampler_to_checkpoint(k) for k in our} == set(up) - {"Qformer.bert.embeddings.position_ids"}


@pytest.mark.parametrize("key", [
    "Qformer.bert.encoder.layer.0.intermediate.dense.weight",
    "Qformer.bert.encoder.layer.3.output.dense.bias",
    "Qformer.bert.encoder.layer.0.output.LayerNorm.weight",
    "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight",
    "Qformer.cls.predictions.bias",
    "visual_encoder.cls_token",
])
def test_unknown_keys_come_back_unchanged(key):
    assert sampler_key_map(key) == key


def test_strict_load_reports_text_path_and_misplaced_keys():
    c = SamplerConfig(**TINY)
    up = random_upstream(c)
    up["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(64, 32)
    up["Qformer.bert.encoder.layer.1.crossattention.self.query.weight"] = torch.zeros(32, 32)  # odd layer
    sd = {sampler_key_map(k): v for k, v in up.items() if sampler_key_map(k) is not None}
    res = PerceiveSampler(c).load_state_dict(sd, strict=False)
    assert not res.missing_keys
    assert sorted(res.unexpected_keys) == ["Qformer.bert.encoder.layer.0.intermediate.dense.weight",
                                           "layers.1.cross_attn.q_proj.weight"]


def test_full_size_shapes_on_meta():
    with torch.device("meta"):
        s = PerceiveSampler()
    c = s.config
    sd = s.state_dict()
    up = upstream_shapes(c, position_ids=False)
    assert set(sampler_to_checkpoint(k) for k in sd) == set(up)
    for k, v in sd.items():
        assert tuple(v.shape) == up[sampler_to_checkpoint(k)], k
    assert up["Qformer.bert.encoder.layer.10.crossattention.self.key.weight"] == (768, 1408)
    assert "Qformer.bert.encoder.layer.11.crossattention.self.key.weight" not in up


def test_meta_construction_and_assign_load():
    ref = tiny_sampler()
    with torch.device("meta"):
        s = PerceiveSampler(SamplerConfig(**TINY))
    s.load_state_dict(ref.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in s.state_dict().values())
    f = features(2)
    with torch.no_grad():
        assert torch.equal(s.eval()(f), ref(f))


def test_half_precision_casts_features():
    s = tiny_sampler().to(torch.bfloat16)
    with torch.no_grad():
        out = s(features(2))  # fp32 features, bf16 weights
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10, 40)


def test_to_blip2_qformer_is_eval_and_same_dtype():
    s = tiny_sampler()
    hf = to_blip2_qformer(s)
    assert not hf.training
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    assert sum(p.numel() for p in hf.parameters()) == sum(
        p.numel() for n, p in s.named_parameters()
        if not n.startswith(("query_tokens", "internlm_proj", "flag_image")))
