"""Our decoder against transformers' LlamaForCausalLM(attention_bias=True) on the same random weights."""
import pytest
import torch

from xcomposer.llm.decoder import kv_cache_bytes, rope_tables

from conftest import VOCAB, tiny_config, tiny_model


@pytest.mark.parametrize("length", [1, 2, 7, 33, 130])
def test_logits_match_transformers(pair, length):
    ours, hf = pair
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        a = ours(ids)
        b = hf(input_ids=ids).logits
    assert a.shape == b.shape == (1, length, VOCAB)
    assert (a - b).abs().max().item() < 1e-4


def test_left_padded_batch_matches_transformers(pair):
    ours, hf = pair
    g = torch.Generator().manual_seed(1)
    lens = [19, 5, 12, 1]
    T = max(lens)
    ids = torch.randint(3, VOCAB, (len(lens), T), generator=g)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, T - n:] = 1
        ids[i, : T - n] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a - b)[real].abs().max().item() < 1e-4
    # each padded row equals that prompt run alone
    for i, n in enumerate(lens):
        with torch.no_grad():
            alone = ours(ids[i:i + 1, T - n:])
        assert (alone[0] - a[i, T - n:]).abs().max().item() < 1e-4


def test_inputs_embeds_equal_input_ids(pair):
    ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(ours(ids), ours(inputs_embeds=ours.embed(ids)))
    with pytest.raises(ValueError, match="exactly one"):
        ours()


def test_incremental_decoding_equals_full_recompute(pair):
    ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
        S = 32
        ours.setup_caches(2, S)
        slots = torch.arange(S)
        valid = torch.zeros(2, S, dtype=torch.bool)
        # prefill 10 tokens, then one token at a time
        P = 10
        valid[:, :P] = True
        cp = slots[:P]
        mask = valid[:, None, None, :] & (slots[None, None, None, :] <= cp[None, None, :, None])
        out = [ours(ids[:, :P], position_ids=cp[None].expand(2, P), cache_pos=cp, kv_mask=mask)]
        for t in range(P, 24):
            valid[:, t] = True
            m = (valid & (slots <= t))[:, None, None, :]
            out.append(ours(ids[:, t:t + 1], position_ids=torch.full((2, 1), t), cache_pos=slots[t:t + 1], kv_mask=m))
        ours.clear_caches()
    inc = torch.cat(out, 1)
    assert (inc - full).abs().max().item() < 1e-4


def test_tied_head_shares_embedding():
    m = tiny_model(tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert "lm_head.weight" in m.state_dict()


def test_rope_dynamic_scaling_only_past_window():
    cos_a, _ = rope_tables(16, 256, 10000.0, 256, dynamic=True)
    cos_b, _ = rope_tables(16, 256, 10000.0, 256, dynamic=False)
    assert torch.equal(cos_a, cos_b)  # inside the trained window nothing changes
    cos_c, _ = rope_tables(16, 512, 10000.0, 256, dynamic=True)
    cos_d, _ = rope_tables(16, 512, 10000.0, 256, dynamic=False)
    assert not torch.allclose(cos_c[300], cos_d[300])
    # the larger base slows every rotating frequency but the first (constant) one
    assert torch.allclose(cos_c[:, 0], cos_d[:, 0])


def test_rope_dynamic_matches_transformers_formula():
    # transformers' dynamic NTK: base * ((factor * L / max_pos) - (factor - 1)) ** (d / (d - 2)), factor 1
    d, L, P, base = 16, 600, 256, 10000.0
    scaled = base * (L / P) ** (d / (d - 2))
    inv = 1.0 / (scaled ** (torch.arange(0, d, 2).float() / d))
    ref = torch.outer(torch.arange(L).float(), inv)
    cos, sin = rope_tables(d, L, base, P, dynamic=True)
    assert torch.allclose(cos[:, : d // 2], ref.cos()) and torch.allclose(sin[:, d // 2:], ref.sin())


def test_config_round_trip_and_validation():
    c = tiny_config()
    d = c.to_dict()
    assert d["model_type"] == "internlm" and d["bias"] is True and d["rotary"]["type"] == "dynamic"
    assert type(c).from_dict(d) == c
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(hidden_size=66)


def test_kv_cache_bytes_for_7b():
    from xcomposer import InternLMConfig
    # 2 (k, v) * 32 layers * 4096 * 2 bytes = 512 KiB per token
    assert kv_cache_bytes(InternLMConfig(), 1, 2048) == 2 * 32 * 4096 * 2 * 2048
