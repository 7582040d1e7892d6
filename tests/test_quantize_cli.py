"""`python -m xcomposer quantize` / `xcomposer.quantize.quantize_checkpoint`: GPTQ exports of the tiny
upstream-layout checkpoints, checked against the published layout (keys, shapes, dtypes, config
fields), against gptqmodel's own dequantization of the written tensors, against round-to-nearest of
the same config (GPTQ must do better on calibration-like text), through our loader, and through the
CLI in a subprocess; and every bad input gives its clear error.

gptqmodel is installed with `pip install --no-deps -r requirements-quantize.txt` (its full
dependency list conflicts with gradio's pillow pin); these tests need it and do not skip."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xcomposer import InternLM
from xcomposer.cli import main as cli_main
from xcomposer.llm.checkpoint import iter_shards
from xcomposer.llm.internlm2 import split_wqkv
from xcomposer.llm.packed_quant import GPTQLinear, PackedSpec, packed_linears, read_packed_quantization
from xcomposer.quantize import (INSTALL, QuantizeError, builtin_calibration, calibration_ids, chat_text,
                                quantize_checkpoint, read_calibration)
from xcomposer.tiny import write_tiny_internlm, write_tiny_internlm2, write_tiny_xcomposer2

GROUP = 32  # the tiny models are 64 wide (intermediate 192): group 128 does not divide them
SHAPE = dict(intermediate_size=192)
FAST = dict(group_size=GROUP, calib_samples=16, calib_seq_len=64, device="cpu")
INTERNLM2_STEMS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
V1_STEMS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for _, shard in iter_shards(folder) for k, v in shard.items()}


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def src2(tmp_path_factory):
    return write_tiny_internlm2(tmp_path_factory.mktemp("qc2") / "src", **SHAPE)


@pytest.fixture(scope="module")
def q2(src2, tmp_path_factory):
    """InternLM2, 4-bit sym group 32, every built-in calibration record (128 tokens each)."""
    out = tmp_path_factory.mktemp("qc2out") / "q"
    report = quantize_checkpoint(src2, out, group_size=GROUP, calib_samples=128, calib_seq_len=128, device="cpu",
                                 log=_quiet)
    return report


# -- layout -------------------------------------------------------------------------------------------

def test_internlm2_export_has_the_published_layout(src2, q2):
    out = q2.out
    src, got = _tensors(src2), _tensors(out)
    cfg = json.loads((out / "config.json").read_text())
    want_q = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True,
              "checkpoint_format": "gptq"}
    assert {k: cfg["quantization_config"][k] for k in want_q} == want_q
    assert json.loads((out / "quantize_config.json").read_text()) == cfg["quantization_config"]
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == json.loads((src2 / "config.json").read_text())
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src2 / name).read_bytes()
    hidden, inter = 64, 192
    qkv_rows = (8 + 2 * 2) * 8  # (heads + 2 kv heads) * head_dim
    shapes = {"attention.wqkv": (hidden, qkv_rows), "attention.wo": (hidden, hidden),
              "feed_forward.w1": (hidden, inter), "feed_forward.w3": (hidden, inter), "feed_forward.w2": (inter, hidden)}
    expected = set()
    for i in range(2):
        for stem, (fin, fout) in shapes.items():
            s = f"model.layers.{i}.{stem}"
            expected |= {f"{s}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx")}
            assert got[f"{s}.qweight"].dtype == torch.int32 and got[f"{s}.qweight"].shape == (fin * 4 // 32, fout)
            assert got[f"{s}.qzeros"].dtype == torch.int32 and got[f"{s}.qzeros"].shape == (fin // GROUP, fout * 4 // 32)
            assert got[f"{s}.scales"].dtype == torch.float16 and got[f"{s}.scales"].shape == (fin // GROUP, fout)
            assert torch.equal(got[f"{s}.g_idx"], torch.arange(fin, dtype=torch.int32) // GROUP)  # no act-order
            # sym, v1: every zero point is 8, stored as 7 in each nibble
            assert bool((got[f"{s}.qzeros"] == 0x77777777).all())
    kept = {k for k in src if not any(f".{stem}.weight" in k for stem in INTERNLM2_STEMS)}
    assert kept >= {"model.tok_embeddings.weight", "output.weight", "model.norm.weight",
                    "model.layers.0.attention_norm.weight", "model.layers.1.ffn_norm.weight"}
    assert set(got) == expected | kept
    for k in kept:  # copied as stored
        assert got[k].dtype == src[k].dtype and torch.equal(got[k], src[k])
    assert q2.linears == 10 and q2.family == "internlm2"


def test_export_loads_and_beats_round_to_nearest(src2, q2):
    """Through InternLM.from_pretrained: logits near the 16-bit model's on calibration-like text,
    and nearer than round-to-nearest with the same bits / group / symmetry (the quantizer grid
    gptqmodel uses, without GPTQ's error feedback)."""
    qm, ref = InternLM.from_pretrained(q2.out), InternLM.from_pretrained(src2)
    assert read_packed_quantization(q2.out) == qm.quantization
    assert len(packed_linears(qm)) == 14 and all(type(m) is GPTQLinear for m in packed_linears(qm))
    rtn = InternLM.from_pretrained(src2, fuse=False)
    with torch.no_grad():
        for layer in rtn.model.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                      layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                m.weight.copy_(_rtn(m.weight, 4, GROUP))
    # the last records of the built-in set, 64 tokens each
    ids = calibration_ids(read_calibration(builtin_calibration())[-20:], ref.tokenizer, "internlm2", samples=20,
                          seq_len=64)
    e_gptq, e_rtn, scale = _logit_rmse(qm, ref, ids), _logit_rmse(rtn, ref, ids), _logit_std(ref, ids)
    print(f"logit RMSE vs 16-bit: GPTQ {e_gptq:.4f}, RTN {e_rtn:.4f} (logit std {scale:.3f})")
    assert e_gptq < 0.93 * e_rtn
    assert e_gptq < 0.6 * scale


def _rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest per group, gptqmodel's grid: scale 2 max|w| / (2^bits - 1), zero 2^(bits-1)."""
    out_f, in_f = w.shape
    maxq = 2 ** bits - 1
    g = w.float().reshape(out_f, in_f // group, group)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(1e-8)
    scale = 2 * amax / maxq
    zero = (maxq + 1) / 2
    return (scale * (torch.clamp(torch.round(g / scale) + zero, 0, maxq) - zero)).reshape(out_f, in_f)


def _logit_rmse(model, ref, ids) -> float:
    num = den = 0.0
    with torch.no_grad():
        for s in ids:
            t = torch.tensor([s])
            d = model(t) - ref(t)
            num += d.pow(2).sum().item()
            den += d.numel()
    return (num / den) ** 0.5


def _logit_std(ref, ids) -> float:
    with torch.no_grad():
        return torch.cat([ref(torch.tensor([s])).flatten() for s in ids]).std().item()


def test_written_tensors_equal_gptqmodels_dequantization(q2):
    """gptqmodel's TorchLinear, given the written tensors (v1 -> its internal v2 as its loader
    converts), dequantizes to exactly the weights our loader runs: the fused wqkv split into q/k/v."""
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    got = _tensors(q2.out)
    qm = InternLM.from_pretrained(q2.out)
    cfg = qm.config
    layer = qm.model.layers[1]
    ours = {"attention.wqkv": (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
            "attention.wo": (layer.self_attn.o_proj,), "feed_forward.w2": (layer.mlp.down_proj,)}
    for stem, modules in ours.items():
        s = f"model.layers.1.{stem}"
        fin = got[f"{s}.g_idx"].numel()
        fout = got[f"{s}.scales"].shape[1]
        ref = TorchLinear(bits=4, group_size=GROUP, sym=True, desc_act=False, in_features=fin, out_features=fout,
                          bias=False, pack_dtype=torch.int32, register_buffers=True)
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(ref, name).copy_(got[f"{s}.{name}"])
        convert_gptq_v1_to_v2_format_module(ref, bits=4, pack_dtype=torch.int32)
        want = ref.dequantize_weight().t()  # (out, in), fp16
        parts = split_wqkv(want, cfg) if len(modules) == 3 else (want,)
        for m, w in zip(modules, parts):
            torch.testing.assert_close(m.dequantize(torch.float16), w, rtol=0, atol=0)
        # and our GPTQLinear built straight from the stored tensors agrees too
        lin = GPTQLinear(fin, fout, PackedSpec("gptq", 4, GROUP, sym=True))
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            getattr(lin, name).copy_(got[f"{s}.{name}"])
        torch.testing.assert_close(lin.dequantize(torch.float16), want, rtol=0, atol=0)


# -- InternLM v1 (biases, act-order, 8 bits) and asymmetric -------------------------------------------

def test_internlm_v1_act_order_8bit_with_biases(tmp_path):
    src = write_tiny_internlm(tmp_path / "src", revision="2023-12", **SHAPE)
    report = quantize_checkpoint(src, tmp_path / "q", bits=8, desc_act=True, log=_quiet, **FAST)
    got, orig = _tensors(report.out), _tensors(src)
    s = "model.layers.0.self_attn.q_proj"
    assert got[f"{s}.qweight"].shape == (64 * 8 // 32, 64) and got[f"{s}.qzeros"].shape == (2, 64 * 8 // 32)
    assert got[f"{s}.bias"].dtype == torch.float16
    torch.testing.assert_close(got[f"{s}.bias"].float(), orig[f"{s}.bias"].half().float())
    assert sorted(got[f"{s}.g_idx"].tolist()) == sorted((torch.arange(64) // GROUP).tolist())
    assert not torch.equal(got[f"{s}.g_idx"], torch.arange(64, dtype=torch.int32) // GROUP)  # act-order permutes
    for stem in V1_STEMS:
        assert f"model.layers.1.{stem}.qweight" in got and f"model.layers.1.{stem}.weight" not in got
    assert torch.equal(got["lm_head.weight"], orig["lm_head.weight"])
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in got  # copied as stored
    cfg = json.loads((report.out / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["desc_act"], cfg["checkpoint_format"]) == (8, True, "gptq")
    assert (report.out / "modeling_internlm.py").read_bytes() == (src / "modeling_internlm.py").read_bytes()
    qm, ref = InternLM.from_pretrained(report.out), InternLM.from_pretrained(src)
    assert qm.chat_template == ref.chat_template == "2023-12"
    ids = calibration_ids(read_calibration(builtin_calibration())[:6], ref.tokenizer, "internlm", samples=6,
                          seq_len=48)
    err, scale = _logit_rmse(qm, ref, ids), _logit_std(ref, ids)
    print(f"8-bit act-order v1: logit RMSE {err:.5f} (logit std {scale:.3f})")
    assert err < 0.05 * scale


def test_asymmetric_one_group_export_is_written_as_gptq_v2(src2, tmp_path):
    """v1 stores zero - 1, which cannot hold an asymmetric zero point of 0: --no-sym writes
    checkpoint_format gptq_v2 (zero points as they are), which the loader reads. Group -1: one group."""
    report = quantize_checkpoint(src2, tmp_path / "q", sym=False, log=_quiet, **{**FAST, "group_size": -1})
    cfg = json.loads((report.out / "config.json").read_text())["quantization_config"]
    assert (cfg["sym"], cfg["checkpoint_format"], cfg["group_size"]) == (False, "gptq_v2", -1)
    got = _tensors(report.out)
    assert got["model.layers.0.feed_forward.w2.qzeros"].shape == (1, 64 * 4 // 32)
    assert not bool((got["model.layers.0.feed_forward.w2.g_idx"] != 0).any())
    qm = InternLM.from_pretrained(report.out)
    assert qm.quantization.checkpoint_format == "gptq_v2"
    with torch.no_grad():
        assert torch.isfinite(qm(torch.tensor([[1, 5, 9, 13]]))).all()


# -- XComposer2: auto_gptq's layout beside the 16-bit Partial LoRA ------------------------------------

def test_xcomposer2_export_keeps_partial_lora_and_vision_in_16_bit(tmp_path):
    from xcomposer.models.xcomposer2 import XComposer2

    src = write_tiny_xcomposer2(tmp_path / "src", **SHAPE)
    report = quantize_checkpoint(src, tmp_path / "q", log=_quiet, **FAST)
    got, orig = _tensors(report.out), _tensors(src)
    for i in range(2):
        for stem in INTERNLM2_STEMS:
            s = f"model.layers.{i}.{stem}"
            assert {f"{s}.linear.{t}" for t in ("qweight", "qzeros", "scales", "g_idx")} <= set(got)
            assert f"{s}.weight" not in got and f"{s}.linear.weight" not in got
    kept = [k for k in orig if "Plora_" in k or k.startswith(("vit.", "vision_proj.", "model.tok_embeddings",
                                                                 "output."))]
    assert any("Plora_B" in k for k in kept) and any(k.startswith("vit.") for k in kept)
    for k in kept:
        assert got[k].dtype == orig[k].dtype and torch.equal(got[k], orig[k])
    qm, ref = XComposer2.from_pretrained(report.out), XComposer2.from_pretrained(src)
    assert type(qm.llm.model.layers[0].self_attn.q_proj) is GPTQLinear
    ids = calibration_ids(read_calibration(builtin_calibration())[:8], ref.tokenizer, "xcomposer2", samples=8,
                          seq_len=48)
    err, scale = _logit_rmse(qm.llm, ref.llm, ids), _logit_std(ref.llm, ids)
    assert err < 0.6 * scale
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[False, True, True, True, False, False]])
    with torch.no_grad():  # the image rows still get Partial LoRA
        assert (qm.llm(inputs_embeds=x, image_mask=mask) - qm.llm(inputs_embeds=x)).abs().amax() > 1e-3


# -- XComposer2.5: loaded as 2.5, quantized as XComposer2, task LoRAs kept in 16-bit ------------------

LAYER_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj")


def test_xcomposer2d5_through_the_cli_loads_back_and_generates(tmp_path, capsys):
    """internlm-xcomposer2d5-7b's layout (tiny): `python -m xcomposer quantize` loads it as 2.5
    (XComposer2.from_pretrained refuses it), writes XComposer2's `.linear` GPTQ stems, copies the
    Partial LoRA, the task LoRAs, the glb/sub GN tokens and the vision weights as stored; the folder
    loads back through XComposer.from_pretrained as an XComposer2d5 whose logits are as near the
    16-bit model's as XComposer2's export (every infer mode), and whose image chat answers
    token for token as the 16-bit model holding the dequantized weights does."""
    from torch import nn

    from vl_util import picture
    from xcomposer import XComposer
    from xcomposer.models.xcomposer2d5 import XComposer2d5
    from xcomposer.tiny import write_tiny_xcomposer2d5

    src = write_tiny_xcomposer2d5(tmp_path / "src", **SHAPE)
    out = tmp_path / "q"
    assert cli_main(["quantize", "--folder", str(src), "--out", str(out), "--group-size", str(GROUP),
                     "--calib-samples", "16", "--calib-seq-len", "64", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "(xcomposer2d5, 2 layers)" in captured.err and "10 quantized linears" in captured.err
    got, orig = _tensors(out), _tensors(src)
    for i in range(2):
        for stem in INTERNLM2_STEMS:
            s = f"model.layers.{i}.{stem}"
            assert {f"{s}.linear.{t}" for t in ("qweight", "qzeros", "scales", "g_idx")} <= set(got)
            assert f"{s}.weight" not in got and f"{s}.linear.weight" not in got
    kept = [k for k in orig if not any(k.endswith(f".{stem}.weight") for stem in INTERNLM2_STEMS)]
    for name in ("lora_web_A", "lora_web_B", "lora_sft_A", "lora_sft_B", "lora_dpo_A", "lora_dpo_B", "Plora_A"):
        assert f"model.layers.1.feed_forward.w2.{name}.weight" in kept
    assert {"plora_glb_GN", "plora_sub_GN"} <= set(kept) and any(k.startswith("vision_proj.") for k in kept)
    assert any(k.startswith("vit.") for k in kept)
    assert set(got) == set(kept) | {f"model.layers.{i}.{stem}.linear.{t}" for i in range(2)
                                    for stem in INTERNLM2_STEMS for t in ("qweight", "qzeros", "scales", "g_idx")}
    for k in kept:  # copied as stored
        assert got[k].dtype == orig[k].dtype and torch.equal(got[k], orig[k])
    cfg = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == json.loads((src / "config.json").read_text())
    assert (cfg["quantization_config"]["bits"], cfg["quantization_config"]["group_size"]) == (4, GROUP)

    qm, ref = XComposer.from_pretrained(out), XComposer.from_pretrained(src)
    assert type(qm) is XComposer2d5 and qm.quantization == read_packed_quantization(out)
    layer = qm.llm.model.layers[0]
    assert all(type(layer.get_submodule(n)) is GPTQLinear for n in LAYER_PROJECTIONS)
    assert type(layer.self_attn.qkv_task.loras["web"].A) is nn.Linear  # task LoRAs stay 16-bit
    ids = calibration_ids(read_calibration(builtin_calibration())[:8], ref.tokenizer, "xcomposer2d5", samples=8,
                          seq_len=48)
    for loras in ((), ("web",), ("sft", "dpo")):  # infer_mode base, web, write
        err, scale = _task_logit_rmse(qm.llm, ref.llm, ids, loras), _task_logit_std(ref.llm, ids, loras)
        assert err < 0.6 * scale, (loras, err, scale)  # XComposer2's bound above
    deq = XComposer.from_pretrained(src, fuse=False)  # the 16-bit model holding the written weights
    with torch.no_grad():
        for lq, ld in zip(qm.llm.model.layers, deq.llm.model.layers):
            for n in LAYER_PROJECTIONS:
                ld.get_submodule(n).weight.copy_(lq.get_submodule(n).dequantize(torch.float32))
    pic = picture(1, (700, 300))
    for mode in ("base", "web", "write"):
        reply, _ = qm.chat("Describe it", image=[pic], infer_mode=mode, do_sample=False, max_new_tokens=6)
        want, _ = deq.chat("Describe it", image=[pic], infer_mode=mode, do_sample=False, max_new_tokens=6)
        assert reply == want and reply


def _task_logit_rmse(model, ref, ids, loras) -> float:
    num = den = 0.0
    with torch.no_grad():
        for s in ids:
            t = torch.tensor([s])
            d = model(t, task_loras=loras) - ref(t, task_loras=loras)
            num += d.pow(2).sum().item()
            den += d.numel()
    return (num / den) ** 0.5


def _task_logit_std(ref, ids, loras) -> float:
    with torch.no_grad():
        return torch.cat([ref(torch.tensor([s]), task_loras=loras).flatten() for s in ids]).std().item()


def test_xcomposer2d5_chat_records_have_no_system_turn_unless_given(tmp_path):
    """2.5's chat adds a system turn only with use_meta=True: calibration chats follow it."""
    from xcomposer.llm.tokenizer import load_tokenizer
    from xcomposer.tiny import write_xcomposer2_tokenizer

    write_xcomposer2_tokenizer(tmp_path, 1000)
    tok = load_tokenizer(tmp_path)
    chat = read_calibration(builtin_calibration())[-5]
    plain = type(chat)(messages=chat.messages[1:])  # the same chat without its system message
    assert chat_text(plain, "xcomposer2d5", tok).startswith(f"<|im_start|>user\n{plain.messages[0][1]}<|im_end|>\n")
    assert chat_text(chat, "xcomposer2d5", tok).startswith(f"<|im_start|>system\n{chat.messages[0][1]}<|im_end|>\n")
    assert chat_text(plain, "xcomposer2", tok).startswith("<|im_start|>system\n")  # XComposer2's default text


def test_xcomposer2_4khd_is_refused_with_the_reason(tmp_path, capsys):
    """XComposer2-4KHD shares the architecture name and `plora_glb_GN`; its remote code tiles with
    HD_transform. This project does not load it, so quantize refuses it before any work."""
    from xcomposer.tiny import write_tiny_xcomposer2d5

    src = write_tiny_xcomposer2d5(tmp_path / "src", **SHAPE)
    (src / "ixc_utils.py").write_text("def HD_transform(img, hd_num=16):\n    return img\n", encoding="utf-8")
    msg = _cli_error(capsys, "--folder", src, "--out", tmp_path / "q", "--group-size", GROUP, "--device", "cpu")
    assert "InternLM-XComposer2-4KHD" in msg and "internlm-xcomposer2d5-7b" in msg
    assert not (tmp_path / "q").exists()


# -- calibration data ---------------------------------------------------------------------------------

def test_calibration_files_and_chat_formats(tmp_path, src2):
    from xcomposer.llm.tokenizer import load_tokenizer

    records = read_calibration(builtin_calibration())
    assert len(records) >= 36 and sum(r.messages is not None for r in records) >= 4
    assert any(r.text and any("\u4e00" <= c <= "\u9fff" for c in r.text) for r in records)  # Chinese too
    txt = tmp_path / "c.txt"
    txt.write_text("First paragraph\nstill first.\n\n\nSecond one.\n", encoding="utf-8")
    assert [r.text for r in read_calibration(txt)] == ["First paragraph\nstill first.", "Second one."]
    chat = read_calibration(builtin_calibration())[-5]
    assert chat.messages[0][0] == "system"
    tok2 = load_tokenizer(src2)
    text = chat_text(chat, "internlm2", tok2)
    assert text.startswith(f"<|im_start|>system\n{chat.messages[0][1]}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith(f"<|im_start|>assistant\n{chat.messages[-1][1]}<|im_end|>\n")
    src1 = write_tiny_internlm(tmp_path / "v1", revision="2023-12", **SHAPE)
    tok1 = load_tokenizer(src1)
    text = chat_text(chat, "internlm", tok1, "2023-12")
    assert text.startswith(f"<|System|>:{chat.messages[0][1]}\n<|User|>:{chat.messages[1][1]}\n<|Bot|>:")
    assert text.endswith(f"{chat.messages[-1][1]}{tok1.eoa}\n")
    ids = calibration_ids(records, tok2, "internlm2", samples=5, seq_len=20)
    assert len(ids) == 5 and all(len(s) <= 20 and s[0] == tok2.bos_token_id for s in ids)


# -- the CLI, end to end --------------------------------------------------------------------------------

def test_cli_end_to_end(src2, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps(r) for r in (
        {"text": "The river runs past the old mill and under three stone bridges."},
        {"messages": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "Seven."}]},
        {"text": "山上的雪开始融化，小溪里的水越来越多。"})) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    run = subprocess.run([sys.executable, "-m", "xcomposer", "quantize", "--folder", str(src2), "--out", str(out),
                          "--group-size", str(GROUP), "--calib", str(calib), "--calib-seq-len", "32", "--desc-act",
                          "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == str(out)
    assert "3 calibration samples" in run.stderr and "layer 2/2" in run.stderr
    spec = read_packed_quantization(out)
    assert (spec.method, spec.bits, spec.group_size, spec.desc_act, spec.sym) == ("gptq", 4, GROUP, True, True)
    assert len(packed_linears(InternLM.from_pretrained(out))) == 14
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


# -- bad input --------------------------------------------------------------------------------------------

def _cli_error(capsys, *argv) -> str:
    assert cli_main(["quantize", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    return err


def test_bad_inputs_give_clear_errors(src2, q2, tmp_path, capsys):
    out = tmp_path / "o"
    base = ("--group-size", GROUP, "--device", "cpu", "--calib-samples", 4, "--calib-seq-len", 16)
    assert "checkpoint folder not found" in _cli_error(capsys, "--folder", tmp_path / "nope", "--out", out, *base)
    assert "quantized already (GPTQ 4-bit" in _cli_error(capsys, "--folder", q2.out, "--out", out, *base)
    msg = _cli_error(capsys, "--folder", src2, "--out", out, "--bits", 3, *base)
    assert "bits=3" in msg and "--bits 4 or --bits 8" in msg
    msg = _cli_error(capsys, "--folder", src2, "--out", out, "--device", "cpu", "--group-size", 48)
    assert "group_size=48 does not divide" in msg and "hidden_size" in msg and "64" in msg
    msg = _cli_error(capsys, "--folder", src2, "--out", out, "--device", "cpu")  # default 128 > 64 inputs
    assert "group_size=128 does not divide" in msg
    msg = _cli_error(capsys, "--folder", src2, "--out", out, "--method", "awq", *base)
    assert "AWQ export is not available" in msg and "--method gptq" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    assert "holds no text" in _cli_error(capsys, "--folder", src2, "--out", out, "--calib", empty, *base)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "never read"}\n', encoding="utf-8")
    msg = _cli_error(capsys, "--folder", src2, "--out", out, "--calib", bad, *base)
    assert f"{bad} line 3: not valid JSON" in msg
    bad.write_text('{"text": "ok"}\n{"prompt": "x"}\n', encoding="utf-8")
    assert "line 2: expected an object with exactly one of" in _cli_error(
        capsys, "--folder", src2, "--out", out, "--calib", bad, *base)
    bad.write_text('{"messages": [{"role": "assistant", "content": "hi"}]}\n', encoding="utf-8")
    assert "line 1: messages must be" in _cli_error(capsys, "--folder", src2, "--out", out, "--calib", bad, *base)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = _cli_error(capsys, "--folder", src2, "--out", out, *base)
    assert "exists and is not empty" in msg and "--overwrite" in msg
    assert "lies in the source folder" in _cli_error(capsys, "--folder", src2, "--out", src2 / "q", *base)
    for kwargs, words in (({"calib_samples": 0}, "calib_samples=0"), ({"group_size": 0}, "group_size=0"),
                          ({"damp_percent": 1.5}, "damp_percent=1.5")):
        with pytest.raises(QuantizeError, match=words):
            quantize_checkpoint(src2, tmp_path / "x", **{**FAST, **kwargs})
    assert not (tmp_path / "x").exists()


def test_missing_gptqmodel_names_the_install_command(src2, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gptqmodel", None)  # import gptqmodel now raises ImportError
    with pytest.raises(QuantizeError) as e:
        quantize_checkpoint(src2, tmp_path / "q", **FAST)
    assert INSTALL in str(e.value) and "pip install --no-deps -r requirements-quantize.txt" in str(e.value)


def test_a_failed_write_leaves_nothing_and_overwrite_replaces(src2, tmp_path, monkeypatch):
    import xcomposer.llm.checkpoint as checkpoint  # what the shared folder writer (llm/derived.py) saves with

    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    real = checkpoint.save_checkpoint

    def failing(sd, folder, **kw):  # a test double for a full disk
        real(sd, folder, **kw)  # the shards are written ...
        raise OSError("disk full")  # ... and then the write fails

    monkeypatch.setattr(checkpoint, "save_checkpoint", failing)
    with pytest.raises(OSError, match="disk full"):
        quantize_checkpoint(src2, out, overwrite=True, log=_quiet, **FAST)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]  # the previous folder is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary folder left behind
    monkeypatch.setattr(checkpoint, "save_checkpoint", real)
    quantize_checkpoint(src2, out, overwrite=True, log=_quiet, **FAST)
    assert not (out / "old.txt").exists() and read_packed_quantization(out).bits == 4
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
