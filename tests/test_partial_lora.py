"""Partial LoRA (XComposer2's Plora) in the one decoder: base + mask * B(A(x)) on every projection."""
import copy

import pytest
import torch

from internlm2_util import tiny2_model, to_llama
from xcomposer.llm.decoder import InternLMForCausalLM
from xcomposer.llm.generation import generate

RANK = 6


def _pair(seed=0):
    """(plain InternLM2 decoder, the same decoder with random Partial LoRA)."""
    plain = tiny2_model(seed)
    lora = copy.deepcopy(plain).add_partial_lora(RANK)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "_lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return plain, lora


def _reference(plain: InternLMForCausalLM, lora: InternLMForCausalLM, x, mask):
    """The plain decoder with forward hooks adding mask * B(A(input)) to each base projection's
    output, the LoRA weights taken from `lora` (q/k/v get their rows of the qkv LoRA's B)."""
    cfg = plain.config
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    hooks = []

    def add(A, B):
        def hook(_module, args, out):
            return out + mask[..., None] * (args[0] @ A.t() @ B.t())
        return hook

    for pl, lo in zip(plain.model.layers, lora.model.layers):
        a, b = lo.self_attn.qkv_lora.A.weight, lo.self_attn.qkv_lora.B.weight
        bq, bk, bv = b.split([q_rows, kv_rows, kv_rows])
        targets = [(pl.self_attn.q_proj, a, bq), (pl.self_attn.k_proj, a, bk), (pl.self_attn.v_proj, a, bv),
                   (pl.self_attn.o_proj, lo.self_attn.o_lora.A.weight, lo.self_attn.o_lora.B.weight),
                   (pl.mlp.gate_proj, lo.mlp.gate_lora.A.weight, lo.mlp.gate_lora.B.weight),
                   (pl.mlp.up_proj, lo.mlp.up_lora.A.weight, lo.mlp.up_lora.B.weight),
                   (pl.mlp.down_proj, lo.mlp.down_lora.A.weight, lo.mlp.down_lora.B.weight)]
        hooks += [m.register_forward_hook(add(A, B)) for m, A, B in targets]
    try:
        with torch.no_grad():
            return plain(inputs_embeds=x)
    finally:
        for h in hooks:
            h.remove()


def _inputs(T=9, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 64, generator=g)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 1:7] = True
    return x, mask


@pytest.mark.parametrize("fuse", [None, False, True])
def test_lora_equals_masked_formula(fuse):
    plain, lora = _pair()
    x, mask = _inputs()
    want = _reference(plain, lora, x, mask.float())
    if fuse is not None:
        lora.fuse_projections(transpose=fuse)
    with torch.no_grad():
        got = lora(inputs_embeds=x, image_mask=mask)
        without = plain(inputs_embeds=x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - without).abs().amax() > 1e-2  # the LoRA does change the image rows


def test_zero_mask_and_no_mask_are_exactly_the_plain_decoder():
    plain, lora = _pair()
    x, _ = _inputs()
    with torch.no_grad():
        want = plain(inputs_embeds=x)
        assert torch.equal(lora(inputs_embeds=x), want)
        assert torch.equal(lora(inputs_embeds=x, image_mask=torch.zeros(2, 9, dtype=torch.bool)), want)


def test_text_positions_before_images_are_untouched():
    plain, lora = _pair()
    x, mask = _inputs()
    with torch.no_grad():
        got = lora(inputs_embeds=x, image_mask=mask)
        base = plain(inputs_embeds=x)
    # causal attention: positions before the first image token see no LoRA at all
    torch.testing.assert_close(got[0, :2], base[0, :2], rtol=0, atol=0)
    torch.testing.assert_close(got[1, :1], base[1, :1], rtol=0, atol=0)


def test_chunked_prefill_and_generation_equal_one_pass():
    _, lora = _pair()
    x, mask = _inputs(T=11)
    with torch.no_grad():
        full = lora(inputs_embeds=x, image_mask=mask)
    rows, masks = [x[0], x[1, 3:]], [mask[0], mask[1, 3:]]  # different lengths: left padding
    one = generate(lora, inputs_embeds=rows, image_mask=masks, max_new_tokens=6, do_sample=False)
    for chunk in (2, 4):
        chunked = generate(lora, inputs_embeds=rows, image_mask=masks, max_new_tokens=6, do_sample=False,
                           prefill_chunk_size=chunk)
        assert chunked.tokens == one.tokens
    assert one.tokens[0][0] == int(full[0, -1].argmax())
    # without the mask the answer differs (the LoRA mattered for this prompt)
    assert generate(lora, inputs_embeds=rows, max_new_tokens=6, do_sample=False).tokens != one.tokens


def test_bad_image_mask_is_named():
    _, lora = _pair()
    x, _ = _inputs()
    with pytest.raises(ValueError, match="image_mask must be"):
        lora(inputs_embeds=x, image_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="image_mask row 0"):
        generate(lora, inputs_embeds=[x[0]], image_mask=[torch.ones(3, dtype=torch.bool)], max_new_tokens=2)


def test_upstream_plora_keys_round_trip():
    _, lora = _pair()
    cfg = lora.config
    sd = lora.state_dict()
    assert sd["model.layers.0.attention.wqkv.Plora_A.weight"].shape == (RANK, 64)
    assert sd["model.layers.0.attention.wqkv.Plora_B.weight"].shape == (
        (cfg.num_attention_heads + 2 * cfg.kv_heads) * cfg.head_dim, RANK)
    for stem in ("attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        assert f"model.layers.1.{stem}.Plora_A.weight" in sd and f"model.layers.1.{stem}.Plora_B.weight" in sd
    assert not any("_lora" in k for k in sd)
    # upstream's Plora_B rows are laid out as wqkv's: split head by head (tests' own to_llama)
    parts = to_llama({"model.layers.0.attention.wqkv.weight": sd["model.layers.0.attention.wqkv.Plora_B.weight"]},
                     cfg)
    ours = lora.model.layers[0].self_attn.qkv_lora.B.weight
    want = torch.cat([parts[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(ours, want)
    other = tiny2_model(5).add_partial_lora(RANK)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
