"""XComposer2.5 image question: time to first token, ours against a transformers peer, same weights.

    python benchmarks/bench_xcomposer2d5.py                  # CPU, small shapes (CLIP 2 layers, decoder 2)
    python benchmarks/bench_xcomposer2d5.py --device cuda    # GPU: internlm-xcomposer2d5-7b's shapes, fp16

Two images, tiled by `vision.hd.hd_pixels` before any timing: a 1120 x 1120 picture at hd_num=4
(2 x 2 crops: 2061 image tokens at 560 px / patch 14) and a 3360 x 2240 picture at hd_num=24
(6 x 4 crops: 10101 image tokens), each with 2.5's chat prompt around it (`<s>`, the image, then the
user turn and the assistant header: TEXT_BEFORE + TEXT_AFTER random text tokens).

What is timed, per side, is the tiled and normalized pixel tensor (1, 3, rows*560, cols*560), already
on the device, -> the first token id (a Python int), in one call:
* ours: `XComposer2d5.encode_tiled(pixels)` (crops + bicubic 560-px global view through the CLIP tower,
  2 x 2 merge, `plora_sub_GN` / `plora_glb_GN` separators, `vision_proj`), the image tokens placed
  between the text embeddings, one uncached prefill `model.llm(inputs_embeds, image_mask,
  last_only=True)` with the Partial LoRA on the image rows, argmax of the last logits;
* peer: transformers' `CLIPVisionModel` holding our CLIP weights on the same crops and global view,
  upstream's merge / separators / projector as plain torch ops (`peer_image_tokens`), then
  transformers' `LlamaForCausalLM` holding our decoder's weights, the Partial LoRA added on the image
  rows by forward hooks (bench_xcomposer2's), `use_cache=False, logits_to_keep=1`, argmax.
Tiling and normalizing the picture (PIL, CPU) are the same code for both and are not timed. Neither
side applies a task LoRA (infer_mode "base"); ours holds them as the checkpoint does.

Both see the same random weights; their first tokens must agree (`first_tokens_match`). With random
weights that token hardly depends on the input, so the warm-up call's image tokens and last logits
are compared too, untimed (`image_tokens_max_abs_diff`, `last_logits_max_abs_diff`). Every figure
is the median of --repeats timed runs after one warm-up, the sides taking turns, synchronized on GPU;
the ratio is peer / ours (> 1: ours is faster). Record results in docs/performance.md with the date,
device and command.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench_decoder import SMALL2, device_name  # noqa: E402
from bench_xcomposer2 import SMALL_CLIP, _peer_hooks, alternate_medians, random_pair  # noqa: E402
from vision.hd import grid_of, hd_grid, hd_pixels  # noqa: E402
from xcomposer.llm.config import InternLM2Config  # noqa: E402
from xcomposer.models.xcomposer2 import ARCHITECTURE  # noqa: E402
from xcomposer.models.xcomposer2d5 import (CROP, XComposer2d5, XComposer2d5Config, hd_tokens,  # noqa: E402
                                           xcomposer2d5_7b_config)

# crops -> (picture width, height, hd_num) that hd_transform tiles into exactly that many crops
PICTURES = {4: (1120, 1120, 4), 24: (3360, 2240, 24)}
# a lone image goes first: "<s>" | image | "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
TEXT_BEFORE, TEXT_AFTER = 1, 24
SMALL_LAYERS, SMALL_CLIP_LAYERS = 2, 2  # CPU defaults: both sizes, 3 repeats in about 50 s on 2 quiet cores
SMALL_TASK_LORAS = {"web": 64, "sft": 64, "dpo": 32}  # carried, not applied (7B: 512 / 512 / 256)


def build(mode: str, device: str, dtype: torch.dtype, num_layers: int | None = None,
          clip_layers: int | None = None, vision_config: dict | None = None):
    """Ours (XComposer2d5, random weights), a transformers CLIPVisionModel and LlamaForCausalLM with copies."""
    if mode == "small":
        llm = dict(SMALL2, torch_dtype="float32", num_hidden_layers=num_layers or SMALL_LAYERS)
        vc = dict(vision_config or SMALL_CLIP)
        vc["num_hidden_layers"] = clip_layers or (vc["num_hidden_layers"] if vision_config else SMALL_CLIP_LAYERS)
        cfg = XComposer2d5Config.from_dict({**InternLM2Config(**llm).to_dict(), "architectures": [ARCHITECTURE],
                                            "vision_config": vc, "plora_rank": 64,
                                            "task_lora_ranks": SMALL_TASK_LORAS})
    else:
        cfg = xcomposer2d5_7b_config()
        if num_layers is not None:
            cfg.llm.num_hidden_layers = num_layers
    return random_pair(XComposer2d5, cfg, device, dtype)


def peer_image_tokens(clip, proj, glb_gn: torch.Tensor, sub_gn: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Upstream's 2.5 image path (build_mlp / img2emb) as torch ops around transformers' CLIP:
    (1, 3, h*560, w*560) pixels -> (tokens, hidden)."""
    dtype = proj[0].weight.dtype
    _, _, H, W = pixels.shape
    h, w = H // CROP, W // CROP
    glb = F.interpolate(pixels.float(), size=(CROP, CROP), mode="bicubic").to(dtype)
    sub = pixels.to(dtype).reshape(1, 3, h, CROP, w, CROP).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, CROP, CROP)
    feats = clip(pixel_values=torch.cat([glb, sub])).last_hidden_state[:, 1:]  # last layer, no class token
    n, L, C = feats.shape
    s = math.isqrt(L) // 2
    x = feats.reshape(n, s, 2, s, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(n, s, s, 4 * C)  # 2 x 2 merge
    glb_img = torch.cat([x[:1], sub_gn.expand(1, s, 1, 4 * C)], dim=2).reshape(1, -1, 4 * C)
    sub_img = x[1:].reshape(1, h, w, s, s, 4 * C).permute(0, 1, 3, 2, 4, 5).reshape(1, h * s, w * s, 4 * C)
    sub_img = torch.cat([sub_img, sub_gn.expand(1, h * s, 1, 4 * C)], dim=2).reshape(1, -1, 4 * C)
    tokens = torch.cat([glb_img, glb_gn, sub_img], dim=1)
    return F.linear(F.gelu(F.linear(tokens, proj[0].weight, proj[0].bias)), proj[2].weight, proj[2].bias)[0]


def _picture(crops: int, seed: int):
    """A random RGB picture that vision.hd tiles into `crops` crops, as a normalized pixel tensor."""
    from PIL import Image

    w, h, hd_num = PICTURES[crops]
    cols, rows = hd_grid(w, h, hd_num)
    assert cols * rows == crops, (w, h, hd_num, cols, rows)
    g = torch.Generator().manual_seed(seed)
    img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
    pixels = hd_pixels(img, hd_num)
    assert grid_of(pixels) == (cols, rows)
    return pixels, (cols, rows), (w, h, hd_num)


def bench_size(ours, clip, hf, crops: int, device: str, repeats: int) -> dict:
    dtype = ours.vision_proj[0].weight.dtype
    g = torch.Generator().manual_seed(crops)
    vocab = ours.config.llm.vocab_size
    before = [1] + torch.randint(3, vocab, (TEXT_BEFORE - 1,), generator=g).tolist()
    after = torch.randint(3, vocab, (TEXT_AFTER,), generator=g).tolist()
    pixels, (cols, rows), (w, h, hd_num) = _picture(crops, seed=crops)
    pixels = pixels.to(device)
    n_img = hd_tokens(cols, rows, ours.config.patch_grid)
    mask = torch.tensor([False] * len(before) + [True] * n_img + [False] * len(after), device=device)
    ids_b, ids_a = torch.tensor(before, device=device), torch.tensor(after, device=device)

    @torch.inference_mode()
    def ask_ours():
        img = ours.encode_tiled(pixels)
        emb = ours.llm.model.embed_tokens
        x = torch.cat([emb(ids_b), img, emb(ids_a)])[None]
        last = ours.llm(inputs_embeds=x, image_mask=mask[None], last_only=True)[0, -1]
        return int(last.argmax()), img, last

    args = (clip, ours.vision_proj, ours.plora_glb_GN.to(dtype), ours.plora_sub_GN.to(dtype))

    @torch.inference_mode()
    def ask_peer():
        img = peer_image_tokens(*args, pixels)
        emb = hf.model.embed_tokens
        x = torch.cat([emb(ids_b), img, emb(ids_a)])[None]
        last = hf(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1]
        return int(last.argmax()), img, last

    hooks = _peer_hooks(ours, hf, mask)
    try:
        (tok_ours, img_ours, last_ours), (tok_peer, img_peer, last_peer) = ask_ours(), ask_peer()  # warm-up
        # with random weights the first token barely depends on the input: compare what leads to it too
        diff = float((img_ours.float() - img_peer.float()).abs().max())
        logits_diff = float((last_ours.float() - last_peer.float()).abs().max())
        del img_ours, img_peer
        med = alternate_medians({"ours": ask_ours, "peer": ask_peer}, repeats, device)
    finally:
        for hk in hooks:
            hk.remove()
    return {"crops": crops, "grid": [cols, rows], "picture": [w, h], "hd_num": hd_num, "image_tokens": n_img,
            "prompt_tokens": len(mask), "ttft_s": med, "peer_over_ours": med["peer"] / med["ours"],
            "first_tokens_match": tok_ours == tok_peer, "first_tokens": {"ours": tok_ours, "peer": tok_peer},
            "image_tokens_max_abs_diff": diff, "last_logits_max_abs_diff": logits_diff}


def bench(device: str = "cpu", mode: str = "small", repeats: int = 3, sizes=(4, 24), num_layers: int | None = None,
          clip_layers: int | None = None, vision_config: dict | None = None) -> dict:
    """Per crop count in `sizes` (keys of PICTURES): tokens, median time to first token per side, ratio."""
    unknown = [n for n in sizes if n not in PICTURES]
    if unknown:
        raise ValueError(f"sizes {unknown}: known crop counts are {sorted(PICTURES)}")
    dtype = torch.float32 if mode == "small" else torch.float16
    ours, clip, hf = build(mode, device, dtype, num_layers, clip_layers, vision_config)
    vc = ours.vit.config
    results = [bench_size(ours, clip, hf, n, device, repeats) for n in sizes]
    return {"device": device_name(device), "mode": mode, "dtype": str(dtype).removeprefix("torch."),
            "repeats": repeats, "decoder_layers": ours.config.llm.num_hidden_layers,
            "clip": {"layers": vc.num_hidden_layers, "width": vc.hidden_size, "patch": vc.patch_size},
            "sizes": results, "first_tokens_match": all(r["first_tokens_match"] for r in results),
            "date": time.strftime("%Y-%m-%d")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=["small", "7b"], default=None, help="default: small on CPU, 7b on CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", default="4,24", help="crop counts, comma separated: 4 (1120x1120, hd_num 4), "
                                                   "24 (3360x2240, hd_num 24)")
    p.add_argument("--num-layers", type=int, default=None,
                   help=f"decoder layers (small default {SMALL_LAYERS}; 7b: 32 unless given)")
    p.add_argument("--clip-layers", type=int, default=None, help=f"small CLIP layers (default {SMALL_CLIP_LAYERS})")
    p.add_argument("--out", "--json", dest="out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    sizes = tuple(int(s) for s in a.sizes.split(",") if s.strip())
    mode = a.mode or ("small" if a.device == "cpu" else "7b")
    if mode == "7b" and a.clip_layers is not None:
        p.error("--clip-layers is for the small mode (7b runs CLIP ViT-L/14's 24 layers)")
    r = bench(a.device, mode, a.repeats, sizes, a.num_layers, a.clip_layers)
    print(f"XComposer2.5 image question ({r['mode']}, {r['dtype']}, {r['device']}, decoder {r['decoder_layers']} "
          f"layers, CLIP {r['clip']['layers']} x {r['clip']['width']}), time to first token, median of {a.repeats}:")
    for s in r["sizes"]:
        print(f"  {s['crops']:>2} crops ({s['grid'][0]}x{s['grid'][1]}, {s['picture'][0]}x{s['picture'][1]} px, "
              f"{s['image_tokens']} image / {s['prompt_tokens']} prompt tokens): ours {s['ttft_s']['ours']:.3f} s, "
              f"transformers peer {s['ttft_s']['peer']:.3f} s, peer/ours {s['peer_over_ours']:.2f}; "
              f"first tokens match: {s['first_tokens_match']} (max abs diff: image tokens "
              f"{s['image_tokens_max_abs_diff']:.1e}, last logits {s['last_logits_max_abs_diff']:.1e})")
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
