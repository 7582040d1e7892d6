"""XComposer2 image question: time to first token, ours against a transformers peer, same weights.

    python benchmarks/bench_xcomposer2.py                  # CPU, small shapes (CLIP 4 layers, decoder 8)
    python benchmarks/bench_xcomposer2.py --device cuda    # GPU: internlm-xcomposer2-vl-7b's shapes, fp16

One image (490 px: 1225 image tokens) and a short chatml question. Ours: `XComposer2.encode_image`
(transformers' CLIPVisionModel + vision_proj) and our InternLM2 decoder with Partial LoRA on the image
rows, one prefill to the first token. Peer: transformers' `CLIPVisionModel`, the projector as torch ops
and transformers' `LlamaForCausalLM` holding the same weights, with the LoRA added on the image rows by
forward hooks. Both see random weights; their first tokens must agree. Reports median seconds and the
ratio (peer / ours); record results in docs/performance.md with date and device.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import CLIPVisionModel, LlamaForCausalLM  # noqa: E402

from bench_decoder import SMALL2, device_name, hf_config, sync  # noqa: E402
from xcomposer.llm.config import InternLM2Config  # noqa: E402
from xcomposer.models.xcomposer2 import ARCHITECTURE, XComposer2, XComposer2Config, xcomposer2_vl_7b_config  # noqa: E402

SMALL_CLIP = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
              "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TEXT_BEFORE, TEXT_AFTER = 40, 12  # chatml head (system turn shortened) and the question with its tail


def build(mode: str, device: str, dtype: torch.dtype, img_size: int = 490, num_layers: int | None = None):
    if mode == "small":
        llm = dict(SMALL2, torch_dtype="float32")
        if num_layers is not None:
            llm["num_hidden_layers"] = num_layers
        cfg = XComposer2Config.from_dict({**InternLM2Config(**llm).to_dict(), "architectures": [ARCHITECTURE],
                                          "img_size": img_size, "max_length": 4096,
                                          "vision_config": SMALL_CLIP, "plora_rank": 64})
    else:
        cfg = xcomposer2_vl_7b_config(img_size)
    return random_pair(XComposer2, cfg, device, dtype)


def alternate_medians(calls: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each call over `repeats` rounds, the calls taking turns, synchronized."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def random_pair(model_cls, cfg, device: str, dtype: torch.dtype):
    """`model_cls(cfg)` with seeded random weights, and transformers' CLIP and Llama holding the same:
    (ours with its projections fused, clip, hf). Shared with bench_xcomposer2d5."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ours = model_cls(cfg).eval()
            g = torch.Generator(device=device).manual_seed(0)
            with torch.no_grad():
                for name, p in ours.named_parameters():
                    p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.02, generator=g)
            clip = CLIPVisionModel(ours.vit.config).eval()
            hf = LlamaForCausalLM(hf_config(cfg.llm)).eval()
    finally:
        torch.set_default_dtype(prev)
    clip.load_state_dict({k: v for k, v in ours.vit.vision_tower.state_dict().items()
                          if not k.endswith("position_ids")}, strict=False)
    plain = {k: v for k, v in torch.nn.Module.state_dict(ours.llm).items() if "_lora." not in k and "_task." not in k}
    missing, unexpected = hf.load_state_dict(plain, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ours.llm.fuse_projections()
    return ours, clip, hf


def _peer_hooks(ours: XComposer2, hf, mask: torch.Tensor):
    cfg = ours.config.llm
    sizes = [cfg.num_attention_heads * cfg.head_dim] + [cfg.kv_heads * cfg.head_dim] * 2
    m = mask[None, :, None].to(hf.dtype)
    hooks = []

    def add(A, B):
        return lambda _mod, args, out: out + m * F.linear(F.linear(args[0], A), B)

    for ol, hl in zip(ours.llm.model.layers, hf.model.layers):
        a = ol.self_attn.qkv_lora.A.weight
        for proj, b in zip((hl.self_attn.q_proj, hl.self_attn.k_proj, hl.self_attn.v_proj),
                           ol.self_attn.qkv_lora.B.weight.split(sizes)):
            hooks.append(proj.register_forward_hook(add(a, b)))
        for proj, lora in ((hl.self_attn.o_proj, ol.self_attn.o_lora), (hl.mlp.gate_proj, ol.mlp.gate_lora),
                           (hl.mlp.up_proj, ol.mlp.up_lora), (hl.mlp.down_proj, ol.mlp.down_lora)):
            hooks.append(proj.register_forward_hook(add(lora.A.weight, lora.B.weight)))
    return hooks


def bench(device: str = "cpu", mode: str = "small", repeats: int = 3, img_size: int = 490,
          num_layers: int | None = None) -> dict:
    dtype = torch.float32 if mode == "small" else torch.float16
    ours, clip, hf = build(mode, device, dtype, img_size, num_layers)
    from xcomposer.llm.generation import generate

    g = torch.Generator().manual_seed(1)
    vocab = ours.config.llm.vocab_size
    before = [1] + torch.randint(3, vocab, (TEXT_BEFORE - 1,), generator=g).tolist()
    after = [1] + torch.randint(3, vocab, (TEXT_AFTER - 1,), generator=g).tolist()
    pixels = torch.randn(1, 3, img_size, img_size, generator=g).to(device)
    n_img = ours.config.tokens_per_image
    mask = torch.tensor([False] * len(before) + [True] * n_img + [False] * len(after), device=device)
    ids_b, ids_a = torch.tensor(before, device=device), torch.tensor(after, device=device)

    @torch.inference_mode()
    def ask_ours():
        img = ours.encode_image(pixels)[0]
        emb = ours.llm.model.embed_tokens
        x = torch.cat([emb(ids_b), img, emb(ids_a)])
        return generate(ours.llm, inputs_embeds=[x], image_mask=[mask], max_new_tokens=1, do_sample=False,
                        eos_token_id=None).tokens[0][0]

    proj = ours.vision_proj
    hooks = _peer_hooks(ours, hf, mask)

    @torch.inference_mode()
    def ask_peer():
        feats = clip(pixel_values=pixels.to(dtype)).last_hidden_state[:, 1:]
        img = F.linear(F.gelu(F.linear(feats, proj[0].weight, proj[0].bias)), proj[2].weight, proj[2].bias)[0]
        emb = hf.model.embed_tokens
        x = torch.cat([emb(ids_b), img, emb(ids_a)])[None]
        return int(hf(inputs_embeds=x).logits[0, -1].argmax())

    try:
        first = {"ours": ask_ours(), "peer": ask_peer()}
        med = alternate_medians({"ours": ask_ours, "peer": ask_peer}, repeats, device)
    finally:
        for h in hooks:
            h.remove()
    return {"device": device_name(device), "mode": mode, "img_size": img_size, "image_tokens": n_img,
            "prompt_tokens": len(mask), "ttft_s": med, "peer_over_ours": med["peer"] / med["ours"],
            "first_tokens_match": first["ours"] == first["peer"], "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=["small", "7b"], default=None, help="default: small on CPU, 7b on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--img-size", type=int, default=490, help="490 (vl-7b) or 224 (-7b)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = bench(a.device, a.mode or ("small" if a.device == "cpu" else "7b"), a.repeats, a.img_size)
    print(f"XComposer2 image question ({r['mode']}, {r['device']}, {r['image_tokens']} image tokens, "
          f"{r['prompt_tokens']} prompt tokens): time to first token ours {r['ttft_s']['ours'] * 1e3:.0f} ms, "
          f"transformers peer {r['ttft_s']['peer'] * 1e3:.0f} ms, peer/ours {r['peer_over_ours']:.2f}; "
          f"first tokens match: {r['first_tokens_match']}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
