"""Image encoding speed: ours (VisionTower + PerceiveSampler) against a peer built from library parts.

    python benchmarks/bench_vision.py                              # CPU: EVA-g width, 2 blocks, real Q-Former
    python benchmarks/bench_vision.py --device cuda --mode full    # real EVA-g/14 (39 blocks) + Q-Former, fp16

What is timed, identical for both sides, under torch.inference_mode():

* encode: pixels (B, 3, 224, 224) -> the 66 LLM embeddings per image, i.e. vision tower,
  ln_vision, Q-Former over the 257 image tokens, internlm_proj and the two image flags;
* sampler: the same from the tower's features onward (Q-Former + projection + flags), which is
  the part where the two sides run different code.

Ours: `vision.VisionTower` + `projector.PerceiveSampler`. Peer: timm's Eva (the same class our
tower wraps, built independently from timm's `eva_giant_patch14_224` recipe, so the tower is
shared code) + nn.LayerNorm + transformers' `Blip2QFormerModel` (fed an all-ones encoder
attention mask, as BLIP-2 does) + nn.Linear + the flags. Both hold the same random weights.

Every figure is the median of --repeats timed calls after one warm-up call; the two sides take
turns within every repeat; torch.cuda.synchronize() brackets each timed call on GPU. The ratio
column is peer time / our time, so > 1 means ours is faster.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch
from torch import nn

import timm
import transformers

from projector import PerceiveSampler, SamplerConfig, init_sampler_weights, to_blip2_qformer
from vision import EvaConfig, VisionTower, init_vision_weights

from bench_decoder import device_name, sync, timed  # shared timing rules (same folder)

CPU_DEPTH = 2  # EVA-g blocks in the CPU mode (width, heads, MLP, image size and token count as the real one)


class PeerEncoder(nn.Module):
    """timm Eva + LayerNorm + transformers' Blip2QFormerModel + Linear + flags."""

    def __init__(self, eva, ln, qformer, query_tokens, proj, flag_start, flag_end):
        super().__init__()
        self.eva, self.ln, self.qformer, self.proj = eva, ln, qformer, proj
        self.query_tokens = nn.Parameter(query_tokens.detach().clone())
        self.flag_start = nn.Parameter(flag_start.detach().clone())
        self.flag_end = nn.Parameter(flag_end.detach().clone())

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln(self.eva.forward_features(pixels))

    def sample(self, feats: torch.Tensor) -> torch.Tensor:
        b = feats.shape[0]
        q = self.qformer(query_embeds=self.query_tokens.expand(b, -1, -1), encoder_hidden_states=feats,
                         encoder_attention_mask=torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device),
                         ).last_hidden_state
        x = self.proj(q)
        return torch.cat([self.flag_start.expand(b, -1, -1), x, self.flag_end.expand(b, -1, -1)], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.sample(self.features(pixels))


class OursEncoder(nn.Module):
    def __init__(self, tower: VisionTower, sampler: PerceiveSampler):
        super().__init__()
        self.tower, self.sampler = tower, sampler

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.sampler(self.tower(pixels))


def build(device: str, dtype: torch.dtype, depth: int, seed: int = 0, llm_hidden: int | None = None):
    """Ours and the peer encoder with the same random weights; `llm_hidden` sets the width of the
    embeddings they produce (default 4096, InternLM-7B's)."""
    ecfg = EvaConfig(depth=depth)
    scfg = SamplerConfig() if llm_hidden is None else SamplerConfig(llm_hidden_size=llm_hidden)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        tower = init_vision_weights(VisionTower(ecfg), g).eval()
        sampler = init_sampler_weights(PerceiveSampler(scfg), g).eval()
        eva = timm.create_model("eva_giant_patch14_224", pretrained=False, depth=depth, mlp_ratio=ecfg.mlp_ratio,
                                num_classes=0, global_pool="", use_post_transformer_norm=False).eval()
        ln = nn.LayerNorm(ecfg.width, eps=ecfg.ln_vision_eps)
        proj = nn.Linear(scfg.hidden_size, scfg.llm_hidden_size)
    sd = tower.state_dict()
    eva.load_state_dict({k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")},
                        strict=True)
    ln.load_state_dict({"weight": sd["ln_vision.weight"], "bias": sd["ln_vision.bias"]})
    proj.load_state_dict(sampler.internlm_proj.state_dict())
    peer = PeerEncoder(eva, ln, to_blip2_qformer(sampler), sampler.query_tokens, proj,
                       sampler.flag_image_start, sampler.flag_image_end).eval()
    ours = OursEncoder(tower, sampler).eval()
    ours.to(dtype)
    peer.to(dtype)
    return ours, peer


def bench(device: str, mode: str, repeats: int, depth: int | None, batches=(1, 8)) -> dict:
    dtype = torch.float16 if mode == "full" else torch.float32
    depth = depth or (EvaConfig().depth if mode == "full" else CPU_DEPTH)
    t0 = time.perf_counter()
    ours, peer = build(device, dtype, depth)
    build_s = time.perf_counter() - t0
    rows, diffs = [], {}
    g = torch.Generator().manual_seed(1)
    for b in batches:
        px = torch.randn(b, 3, 224, 224, generator=g).to(device, dtype)
        feats = ours.tower(px)
        a, p = ours(px), peer(px)
        diffs[f"encode batch {b}"] = (a.float() - p.float()).abs().max().item()
        diffs[f"sampler batch {b}"] = (ours.sampler(feats).float() - peer.sample(feats).float()).abs().max().item()
        t = timed({"ours": lambda: ours(px), "peer": lambda: peer(px)}, device, repeats)
        rows.append((f"encode batch {b}: pixels -> {ours.sampler.config.tokens_per_image} embeddings/image (ms)",
                     t["ours"] * 1e3, t["peer"] * 1e3, t["peer"] / t["ours"]))
        t = timed({"ours": lambda: ours.sampler(feats), "peer": lambda: peer.sample(feats)}, device, repeats)
        rows.append((f"sampler batch {b}: features -> embeddings, Q-Former + proj + flags (ms)",
                     t["ours"] * 1e3, t["peer"] * 1e3, t["peer"] / t["ours"]))
    qf = peer.qformer.config
    return dict(
        date=datetime.date.today().isoformat(), device=device_name(device), threads=torch.get_num_threads(),
        torch=torch.__version__, timm=timm.__version__, transformers=transformers.__version__,
        mode=mode, dtype=str(dtype).replace("torch.", ""), eva=dict(EvaConfig(depth=depth).to_dict()),
        sampler=SamplerConfig().to_dict(), hf_attn=qf._attn_implementation, repeats=repeats,
        params_tower=sum(p.numel() for p in ours.tower.parameters()),
        params_sampler=sum(p.numel() for p in ours.sampler.parameters()), build_s=build_s,
        max_abs_diff=diffs, rows=[dict(name=n, ours=o, peer=p, ratio=r) for n, o, p, r in rows],
    )


def print_report(r: dict) -> None:
    print(f"date {r['date']}  device {r['device']}  torch.get_num_threads() {r['threads']}")
    print(f"torch {r['torch']}  timm {r['timm']}  transformers {r['transformers']} (Blip2QFormer attn: {r['hf_attn']})")
    e = r["eva"]
    print(f"mode {r['mode']}  dtype {r['dtype']}  EVA width {e['width']} depth {e['depth']} heads {e['heads']} "
          f"img {e['img_size']}/{e['patch_size']} ({1 + (e['img_size'] // e['patch_size']) ** 2} tokens)  "
          f"Q-Former {r['sampler']['num_hidden_layers']} layers x {r['sampler']['hidden_size']}, "
          f"{r['sampler']['num_query_token']} queries -> {r['sampler']['llm_hidden_size']}")
    print(f"parameters: tower {r['params_tower'] / 1e6:.1f} M, sampler {r['params_sampler'] / 1e6:.1f} M; "
          f"median of {r['repeats']} runs after 1 warm-up")
    print("max |ours - peer|: " + ", ".join(f"{k} {v:.2e}" for k, v in r["max_abs_diff"].items()))
    print()
    print("| measurement | ours | peer (timm Eva + transformers Blip2QFormerModel) | ratio (peer / ours) |")
    print("|---|---:|---:|---:|")
    for row in r["rows"]:
        print(f"| {row['name']} | {row['ours']:.2f} | {row['peer']:.2f} | {row['ratio']:.2f} |")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=["small", "full"], default=None,
                   help=f"small: fp32, EVA-g with {CPU_DEPTH} blocks (CPU default); full: EVA-g 39 blocks, fp16 "
                        "(CUDA default)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5 CPU, 20 CUDA)")
    p.add_argument("--depth", type=int, default=None, help="override the EVA block count")
    p.add_argument("--json", default=None, help="also write the results to this file")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    mode = a.mode or ("full" if cuda else "small")
    if mode == "full" and not cuda:
        p.error("--mode full runs in fp16 and needs --device cuda")
    r = bench(a.device, mode, a.repeats or (20 if cuda else 5), a.depth)
    print_report(r)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    main()
