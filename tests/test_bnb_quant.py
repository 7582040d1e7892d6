"""8-bit and 4-bit weights through bitsandbytes (xcomposer.llm.quant), on this CPU.

The reference is transformers' `LlamaForCausalLM.from_pretrained(..., quantization_config=
BitsAndBytesConfig(...))` on the same weights: code nobody here wrote, driving the same
bitsandbytes kernels. Both sides quantize the same float32 weights with the same settings, so the
logits agree to float32 rounding (in practice bit for bit); the tolerance below is the float32
difference of the two unquantized models, which differ only in their attention code.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from xcomposer import InternLM, XComposer
from xcomposer.llm.checkpoint import iter_shards
from xcomposer.llm.generation import generate
from xcomposer.llm.quant import (BnbQuantization, QuantizationError, model_weight_bytes, quantized_linears,
                                 resolve_quantization)
from xcomposer.parallel import sharding
from xcomposer.tiny import write_tiny_internlm, write_tiny_internlm2, write_tiny_xcomposer2

sys.path.insert(0, str(Path(__file__).parent))
from conftest import hf_twin  # noqa: E402
from internlm2_util import hf_llama  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

# bitsandbytes' CPU 4-bit kernel repacks 32 output rows at a time: tiny shapes that honour it
SHAPE = dict(hidden_size=128, intermediate_size=192)
PROMPTS = [[5, 17, 99, 3, 250, 8, 41, 77], [9, 9, 120, 4]]
SETTINGS = {  # our words -> transformers' BitsAndBytesConfig words
    "int8": (dict(load_in_8bit=True), dict(load_in_8bit=True)),
    "fp4": (dict(load_in_4bit=True), dict(load_in_4bit=True)),
    "nf4+dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
               dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
}


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny InternLM2 and InternLM v1 checkpoints, and transformers' Llama twins of each saved in
    transformers' own layout (what its bitsandbytes loader reads)."""
    root = tmp_path_factory.mktemp("bnb")
    out = {}
    for family, write, twin in (("internlm2", write_tiny_internlm2, None), ("v1", write_tiny_internlm, hf_twin)):
        folder = write(root / family, **SHAPE)
        plain = InternLM.from_pretrained(folder, dtype=torch.float32, fuse=False)
        if twin is None:
            state = {}
            for _, sd in iter_shards(folder):
                state.update(sd)
            hf = hf_llama(plain.config, state)
        else:
            hf = twin(plain)
        hf.save_pretrained(root / f"{family}-hf")
        out[family] = (folder, root / f"{family}-hf", plain, hf)
    return out


@pytest.mark.parametrize("family", ["internlm2", "v1"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_logits_and_greedy_equal_transformers_bitsandbytes(folders, family, setting):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    folder, hf_folder, plain, hf = folders[family]
    ours_kw, theirs_kw = SETTINGS[setting]
    ours = InternLM.from_pretrained(folder, dtype=torch.float32, **ours_kw)
    theirs = LlamaForCausalLM.from_pretrained(hf_folder, quantization_config=BitsAndBytesConfig(**theirs_kw),
                                              device_map="cpu", dtype=torch.float32).eval()
    ids = torch.tensor([PROMPTS[0]])
    float_gap = (_logits(plain, ids) - _logits(hf, ids)).abs().max().item()
    a, b = _logits(ours, ids), _logits(theirs, ids)
    quant_error = (b - _logits(hf, ids)).abs().max().item()
    assert quant_error > 10 * max(float_gap, 1e-6)  # the weights really are quantized
    assert (a - b).abs().max().item() <= max(4 * float_gap, 1e-5)
    # every projection is a bitsandbytes module; embeddings and the head stay float
    kinds = {type(m).__name__ for m in quantized_linears(ours)}
    assert kinds == {"Linear8bitLt" if setting == "int8" else "Linear4bit"}
    assert len(quantized_linears(ours)) == 7 * ours.config.num_hidden_layers
    assert ours.model.embed_tokens.weight.dtype == torch.float32
    # greedy replies, ours (the generation engine) vs transformers' generate
    for prompt in PROMPTS:
        mine = generate(ours, [prompt], max_new_tokens=8, do_sample=False, eos_token_id=[]).tokens[0]
        with torch.no_grad():
            full = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                   pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert mine == full[0, len(prompt):].tolist()


def _stored_bytes(module, tables: bool = True) -> int:
    """Bytes bitsandbytes keeps for one quantized weight: the packed data and its quantization state
    (`tables=False`: without the fixed-size code tables, which a 7B layer does not notice)."""
    w = module.weight
    total = w.numel() * w.element_size()
    if isinstance(module, bnb.nn.Linear8bitLt):
        return total + w.SCB.numel() * w.SCB.element_size()
    state = w.quant_state
    total += state.absmax.numel() * state.absmax.element_size()
    total += tables * state.code.numel() * state.code.element_size()
    if state.nested:
        s2 = state.state2
        total += s2.absmax.numel() * s2.absmax.element_size() + tables * s2.code.numel() * s2.code.element_size()
        total += state.offset.numel() * state.offset.element_size()
    return total


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_stored_bytes_match_the_plan(folders, setting):
    folder, _, plain, _ = folders["internlm2"]
    ours = InternLM.from_pretrained(folder, dtype=torch.float16, **SETTINGS[setting][0])
    q = ours.quantization
    mods = quantized_linears(ours)
    stored = sum(_stored_bytes(m) for m in mods)
    planned = sum(q.weight_bytes(m.in_features, m.out_features) for m in mods)
    assert stored <= planned <= stored + 16 * 4 * len(mods)  # the plan may count the 16-entry code per module
    fp16 = sum(m.in_features * m.out_features * 2 for m in mods)
    # int8: one byte per weight + a float32 scale per row (of mostly 128 inputs here); 4-bit: half a byte + a float32 (or, double
    # quantized, an 8-bit) scale per 64 weights
    expected = {"int8": 0.5 + 4 / 128 / 2, "fp4": 0.25 + 4 / 64 / 2, "nf4+dq": 0.25 + 1 / 64 / 2}[setting]
    assert sum(_stored_bytes(m, tables=False) for m in mods) / fp16 == pytest.approx(expected, rel=0.02)
    # the whole model as the planner sees it (meta device) against the loaded one
    with torch.device("meta"):
        meta = InternLM(ours.config)
    loaded = sum(p.numel() * p.element_size() for n, p in ours.named_parameters()
                 if not any(n.startswith(f"{k}.") for k in _names_of(ours, mods)))
    assert model_weight_bytes(meta, torch.float16, q) == pytest.approx(loaded + stored, rel=0.02)


def _names_of(model, mods) -> list[str]:
    ids = {id(m) for m in mods}
    return [n for n, m in model.named_modules() if id(m) in ids]


def test_quantized_model_chats_and_serves_in_the_paged_engine(folders):
    from xcomposer.engine import Engine, Prompt
    from xcomposer.llm.generation import GenerationConfig

    folder = folders["internlm2"][0]
    model = InternLM.from_pretrained(folder, quantization="nf4")
    assert model.quantization == BnbQuantization("nf4", compute_dtype=None, double_quant=True)
    assert "nf4" in model.load_notes[-1]
    reply, history = model.chat(model.tokenizer, "hello", history=[], do_sample=False, max_new_tokens=6)
    assert isinstance(reply, str) and history == [("hello", reply)]
    expected = [generate(model, [p], max_new_tokens=6, do_sample=False, eos_token_id=[]).tokens[0] for p in PROMPTS]
    cfg = GenerationConfig(eos_token_id=None, pad_token_id=0, max_new_tokens=6, do_sample=False)
    with Engine(model, max_batch_size=2, session_len=128, block_size=16) as engine:
        got = [engine.generate(Prompt(ids=p), cfg, timeout=120)[1].tokens for p in PROMPTS]
    assert got == expected


@pytest.fixture(scope="module")
def xc2_folder(tmp_path_factory):
    return write_tiny_xcomposer2(tmp_path_factory.mktemp("bnb-xc2") / "ckpt", **SHAPE)


def test_xcomposer2_quantized_keeps_partial_lora_and_tower_in_float(xc2_folder):
    """The 4-bit XComposer2 equals the float model holding bitsandbytes' own dequantized weights
    (`bitsandbytes.functional.dequantize_4bit`), Partial LoRA included, on an image question."""
    from PIL import Image

    plain = XComposer.from_pretrained(xc2_folder, dtype=torch.float32, fuse=False)
    q = XComposer.from_pretrained(xc2_folder, dtype=torch.float32, quantization="nf4")
    mods = quantized_linears(q)
    assert len(mods) == 7 * q.llm.config.num_hidden_layers  # the decoder's projections only
    assert q.llm.model.layers[0].self_attn.qkv_lora.A.weight.dtype == torch.float32
    assert all(type(m) is torch.nn.Linear for m in q.vit.modules() if isinstance(m, torch.nn.Linear))
    names = {id(m): n for n, m in q.named_modules()}
    with torch.no_grad():
        for m in mods:
            plain.get_submodule(names[id(m)]).weight.copy_(
                bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    x, mask, _ = q.build_inputs("What is this?", image=image)
    assert mask.any()
    # bitsandbytes' CPU kernel runs 4-bit products in bfloat16 in eval mode; in train mode it
    # dequantizes and multiplies in the input dtype, the reference's own arithmetic
    q.train()
    with torch.no_grad():
        a = plain.llm(inputs_embeds=x[None], image_mask=mask[None])
        b = q.llm(inputs_embeds=x[None], image_mask=mask[None])
    q.eval()
    assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item()
    assert isinstance(q.generate("What is this?", image=image, max_new_tokens=4, do_sample=False), str)
    # the tower's linears too, on request; the projector stays float
    qv = XComposer.from_pretrained(xc2_folder, dtype=torch.float32, quantization="int8", quantize_vision=True)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in qv.vit.modules())
    assert all(type(m) is torch.nn.Linear for m in qv.vision_proj.modules() if isinstance(m, torch.nn.Linear))
    assert isinstance(qv.generate("What is this?", image=image, max_new_tokens=4, do_sample=False), str)


# -- memory planning ---------------------------------------------------------------------------
GB = 1 << 30  # a card sold as "8 GB" has 8 GiB


def test_four_bit_plans_a_7b_chat_model_onto_an_8gb_card():
    from xcomposer.llm.config import internlm2_5_7b_chat_config

    cfg = internlm2_5_7b_chat_config()
    nf4 = resolve_quantization(quantization="nf4")
    fp16 = sharding.memory_report(cfg, 1, torch.float16, cache_len=16384, budgets=[8 * GB])
    four = sharding.memory_report(cfg, 1, torch.float16, cache_len=16384, budgets=[8 * GB], quantization=nf4)
    assert not fp16.fits and four.fits
    # 7.7B parameters: the 7.0B in projections go to ~0.52 bytes each, the 0.76B of embeddings and
    # head stay 2 bytes: about 5 GiB in all instead of 14.4
    assert four.param_bytes / fp16.param_bytes == pytest.approx(0.33, abs=0.02)
    assert "nf4" in str(four)
    # 8-bit halves the projections: the 7B fits a 16 GB card with a 32k session, fp16 needs two
    int8 = resolve_quantization(load_in_8bit=True)
    assert sharding.gpus_needed(cfg, 16 * GB, cache_len=32768)[0] == 2
    assert sharding.gpus_needed(cfg, 16 * GB, cache_len=32768, quantization=int8)[0] == 1
    with pytest.raises(sharding.ShardingError, match="load_in_4bit"):
        sharding.check_fits(fp16, cfg)


def test_four_bit_plans_xcomposer2_onto_a_12gb_card():
    from xcomposer.models.xcomposer2 import xcomposer2_vl_7b_config

    cfg = xcomposer2_vl_7b_config()
    kw = dict(cache_len=cfg.max_length, budgets=[12 * GB])
    assert not sharding.memory_report(cfg, 1, torch.float16, **kw).fits
    four = sharding.memory_report(cfg, 1, torch.float16, quantization=resolve_quantization(quantization="nf4"), **kw)
    assert four.fits
    tower = sharding.memory_report(cfg, 1, torch.float16, **kw,
                                   quantization=resolve_quantization(quantization="nf4", quantize_vision=True))
    assert tower.param_bytes < four.param_bytes  # the CLIP tower's linears shrink too


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(load_in_8bit=True, load_in_4bit=True), "choose one"),
    (dict(quantization="int3"), "int8, nf4, fp4"),
    (dict(bnb_4bit_quant_type="nf4"), "without load_in_4bit"),
    (dict(load_in_8bit=True, bnb_4bit_quant_type="nf4"), "apply to 4-bit"),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="int4"), "'nf4' and 'fp4'"),
    (dict(load_in_4bit=True, bnb_4bit_compute_dtype="int8"), "not a floating dtype"),
    (dict(load_in_8bit=True, llm_int8_threshold=float("nan")), "finite number"),
    (dict(quantization="nf4", bnb_4bit_quant_type="fp4"), "contradicts"),
    (dict(quantization_config={"load_in_8bit": True, "llm_int8_skip_modules": ["mlp"]}), "llm_int8_skip_modules"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "GPTQ / AWQ checkpoints"),
    (dict(quantize_vision=True), "quantize_vision"),
])
def test_bad_options_are_named(kw, match):
    with pytest.raises(QuantizationError, match=match):
        resolve_quantization(**kw)


def test_transformers_config_object_is_understood():
    from transformers import BitsAndBytesConfig

    q = resolve_quantization(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                    bnb_4bit_compute_dtype=torch.bfloat16))
    assert q == BnbQuantization("nf4", compute_dtype=torch.bfloat16, double_quant=False)
    assert resolve_quantization(quantization_config=BitsAndBytesConfig(load_in_8bit=True)) == \
        BnbQuantization("int8", compute_dtype=None)
    assert resolve_quantization() is None


def test_load_errors_name_the_problem(folders, tmp_path):
    folder = folders["internlm2"][0]
    with pytest.raises(QuantizationError, match="vision tower"):
        InternLM.from_pretrained(folder, quantization=BnbQuantization("int8", quantize_vision=True))
    odd = write_tiny_internlm2(tmp_path / "odd")  # 2 kv heads of 8: 16 rows, not a multiple of 32
    with pytest.raises(QuantizationError, match=r"layer 0 self_attn.k_proj is 16 x 64.*multiple of 32"):
        InternLM.from_pretrained(odd, load_in_4bit=True)
    # int8 has no such constraint
    assert quantized_linears(InternLM.from_pretrained(odd, load_in_8bit=True))
    with pytest.raises(QuantizationError, match="choose one"):
        InternLM.from_pretrained(folder, load_in_8bit=True, quantization="nf4")


def test_serve_flags(tmp_path):
    import argparse

    from xcomposer.serve.options import add_serve_arguments, quantization_options, resolve_serve_arguments

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    parse = lambda *a: p.parse_args(["PATH", *a])  # noqa: E731
    assert quantization_options(parse()) == {}
    assert quantization_options(parse("--load-in-4bit")) == {"load_in_4bit": True}
    assert quantization_options(parse("--quantization", "nf4", "--quantize-vision")) == \
        {"quantization": "nf4", "quantize_vision": True}
    with pytest.raises(SystemExit):  # argparse: the flags exclude each other
        parse("--load-in-8bit", "--load-in-4bit")
    with pytest.raises(ValueError, match="--quantize-vision needs"):
        quantization_options(parse("--quantize-vision"))
    args = parse("--load-in-8bit", "--tp", "2")
    with pytest.raises(ValueError, match="not combined with --tp"):
        resolve_serve_arguments(args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_cuda_equals_transformers_and_holds_only_quantized_bytes(folders, setting):
    """On a GPU (fp16): logits against transformers + bitsandbytes, greedy tokens equal, and the
    memory the load leaves allocated is the planned bytes (no 16-bit projection stays behind)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    folder, hf_folder, _, _ = folders["internlm2"]
    ours_kw, theirs_kw = SETTINGS[setting]
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    ours = InternLM.from_pretrained(folder, device="cuda", dtype=torch.float16, **ours_kw)
    held = torch.cuda.memory_allocated() - before
    with torch.device("meta"):
        meta = InternLM(ours.config)
    planned = model_weight_bytes(meta, torch.float16, ours.quantization)
    assert held <= planned * 1.1 + (1 << 20)
    theirs = LlamaForCausalLM.from_pretrained(hf_folder, quantization_config=BitsAndBytesConfig(**theirs_kw),
                                              device_map="cuda", dtype=torch.float16).eval()
    ids = torch.tensor([PROMPTS[0]], device="cuda")
    a, b = _logits(ours, ids).float(), _logits(theirs, ids).float()
    assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item()  # fp16 attention kernels differ
    mine = generate(ours, [PROMPTS[0]], max_new_tokens=8, do_sample=False, eos_token_id=[]).tokens[0]
    with torch.no_grad():
        full = theirs.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                               attention_mask=torch.ones_like(ids))
    assert mine == full[0, len(PROMPTS[0]):].tolist()
    with pytest.raises(ValueError, match="CUDA graphs"):
        from xcomposer.llm.fast_decode import use_cuda_graphs
        use_cuda_graphs(ours)
