"""InternLM2 / InternLM2.5 checkpoints: the key map between upstream's layout and our decoder.

Upstream (`modeling_internlm2.py`, facts and sources in docs/checkpoint-format.md) names the
decoder `model.tok_embeddings`, `model.layers.N.attention.{wqkv,wo}`,
`model.layers.N.feed_forward.{w1,w3,w2}` (gate, up, down), `attention_norm`, `ffn_norm`,
`model.norm` and `output`. Its `wqkv` is one matrix laid out per kv head h as
`[q_{g*h} .. q_{g*h+g-1}, k_h, v_h]` (g = heads / kv heads, head_dim rows each). We split it once
at load time into the decoder's q/k/v (the same tensors the v1 layout has, with fewer k/v rows),
and `state_dict()` packs it back, so a loaded model saves in upstream's layout.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch

from .checkpoint import SplitKey
from .config import InternLM2Config, InternLMConfig

# upstream suffix inside a layer -> ours (one-to-one renames; wqkv is split separately)
_LAYER_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    # XComposer2's Partial LoRA (PLoRA modules: Plora_A, Plora_B) on each projection
    "attention.wqkv.Plora_A": "self_attn.qkv_lora.A",
    "attention.wo.Plora_A": "self_attn.o_lora.A",
    "attention.wo.Plora_B": "self_attn.o_lora.B",
    "feed_forward.w1.Plora_A": "mlp.gate_lora.A",
    "feed_forward.w1.Plora_B": "mlp.gate_lora.B",
    "feed_forward.w3.Plora_A": "mlp.up_lora.A",
    "feed_forward.w3.Plora_B": "mlp.up_lora.B",
    "feed_forward.w2.Plora_A": "mlp.down_lora.A",
    "feed_forward.w2.Plora_B": "mlp.down_lora.B",
}
_QKV_LORA_B = "self_attn.qkv_lora.B"  # upstream attention.wqkv.Plora_B: rows in wqkv's layout
# XComposer2.5's task LoRAs (PLoRA's lora_web / lora_sft / lora_dpo, `_A` and `_B`) on each projection
_TASK_PROJ = {"attention.wqkv": "self_attn.qkv_task", "attention.wo": "self_attn.o_task",
              "feed_forward.w1": "mlp.gate_task", "feed_forward.w3": "mlp.up_task", "feed_forward.w2": "mlp.down_task"}
_TASK_UP = re.compile(r"^(attention\.wqkv|attention\.wo|feed_forward\.w[123])\.lora_([a-z]+)_([AB])$")
_TASK_OURS = re.compile(r"^(self_attn\.(?:qkv|o)_task|mlp\.(?:gate|up|down)_task)\.loras\.([a-z]+)\.([AB])$")
_TOP_RENAMES = {"model.tok_embeddings": "model.embed_tokens", "model.norm": "model.norm", "output": "lm_head"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_TOP = re.compile(r"^(.+)\.(weight|bias)$")


def split_wqkv(w: torch.Tensor, cfg: InternLMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upstream's packed (H + 2 KV) * D rows (a weight or a bias) -> (q, k, v) in head order."""
    kv, g, d = cfg.kv_heads, cfg.kv_groups, cfg.head_dim
    rows = (cfg.num_attention_heads + 2 * kv) * d
    if w.shape[0] != rows:
        raise ValueError(f"wqkv has {w.shape[0]} rows, config.json implies (heads {cfg.num_attention_heads} + "
                         f"2 x kv heads {kv}) x head_dim {d} = {rows}")
    blocks = w.reshape(kv, g + 2, d, *w.shape[1:])
    q = blocks[:, :g].reshape(kv * g * d, *w.shape[1:])
    k = blocks[:, g].reshape(kv * d, *w.shape[1:])
    v = blocks[:, g + 1].reshape(kv * d, *w.shape[1:])
    return q.clone(), k.clone(), v.clone()


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: InternLMConfig) -> torch.Tensor:
    """The inverse of `split_wqkv`: q/k/v rows back into upstream's per-kv-head groups."""
    kv, g, d = cfg.kv_heads, cfg.kv_groups, cfg.head_dim
    rest = q.shape[1:]
    blocks = torch.cat([q.reshape(kv, g, d, *rest), k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)], dim=1)
    return blocks.reshape((g + 2) * kv * d, *rest)


def checkpoint_key_map(cfg: InternLMConfig) -> Callable[[str], str | SplitKey | None]:
    """Upstream key -> our parameter name (a `SplitKey` for `wqkv`); unknown keys pass through
    unchanged, so strict loading names them as unexpected."""

    def key_map(key: str):
        m = _LAYER.match(key)
        if m:
            i, stem, kind = m.groups()
            if stem == "attention.wqkv":
                names = tuple(f"model.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv")
                return SplitKey(names, lambda t: split_wqkv(t, cfg))
            if stem == "attention.wqkv.Plora_B":  # wqkv's kv-group rows -> our q | k | v rows
                return SplitKey((f"model.layers.{i}.{_QKV_LORA_B}.{kind}",), lambda t: (torch.cat(split_wqkv(t, cfg)),))
            if stem in _LAYER_RENAMES:
                return f"model.layers.{i}.{_LAYER_RENAMES[stem]}.{kind}"
            t = _TASK_UP.match(stem)
            if t:
                proj, task, ab = t.groups()
                name = f"model.layers.{i}.{_TASK_PROJ[proj]}.loras.{task}.{ab}.{kind}"
                if proj == "attention.wqkv" and ab == "B":  # rows in wqkv's kv-group layout -> q | k | v
                    return SplitKey((name,), lambda t: (torch.cat(split_wqkv(t, cfg)),))
                return name
            return key
        m = _TOP.match(key)
        if m and m.group(1) in _TOP_RENAMES:
            return f"{_TOP_RENAMES[m.group(1)]}.{m.group(2)}"
        return key

    return key_map


_OURS_LAYER = {v: k for k, v in _LAYER_RENAMES.items()}
_OURS_TOP = {v: k for k, v in _TOP_RENAMES.items()}


def upstream_name(name: str) -> str | None:
    """Our parameter name -> the upstream key that holds it (q/k/v all live in `wqkv`)."""
    m = _LAYER.match(name)
    if m:
        i, stem, kind = m.groups()
        if stem in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return f"model.layers.{i}.attention.wqkv.{kind}"
        if stem == _QKV_LORA_B:
            return f"model.layers.{i}.attention.wqkv.Plora_B.{kind}"
        t = _TASK_OURS.match(stem)
        if t:
            proj, task, ab = t.groups()
            up = next(k for k, v in _TASK_PROJ.items() if v == proj)
            return f"model.layers.{i}.{up}.lora_{task}_{ab}.{kind}"
        return f"model.layers.{i}.{_OURS_LAYER.get(stem, stem)}.{kind}"
    m = _TOP.match(name)
    if m and m.group(1) in _OURS_TOP:
        return f"{_OURS_TOP[m.group(1)]}.{m.group(2)}"
    return name


def to_internlm2_state_dict(sd: dict, cfg: InternLMConfig, prefix: str = "") -> dict:
    """Rename our keys under `prefix` to upstream's and pack q/k/v into `wqkv`, in place, keeping
    upstream's order (embeddings, then each layer's attention, feed-forward and norms, then the
    final norm and head)."""
    ours = [k for k in sd if k.startswith(prefix)]
    items = {k[len(prefix):]: sd.pop(k) for k in ours}
    out: dict[str, torch.Tensor] = {}
    for name, t in items.items():
        m = _LAYER.match(name)
        if m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            i, _, kind = m.groups()
            key = f"model.layers.{i}.attention.wqkv.{kind}"
            if key not in out:
                base = f"model.layers.{i}.self_attn"
                parts = [items[f"{base}.{p}_proj.{kind}"] for p in "qkv"]
                out[key] = pack_wqkv(*(p.detach() for p in parts), cfg)
            continue
        t_m = _TASK_OURS.match(m.group(2)) if m else None
        if m and (m.group(2) == _QKV_LORA_B or (t_m and t_m.group(1) == "self_attn.qkv_task" and t_m.group(3) == "B")):
            # q | k | v rows back into wqkv's layout
            q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
            t = pack_wqkv(*t.detach().split([q_rows, kv_rows, kv_rows]), cfg)
        out[upstream_name(name)] = t
    for k, v in out.items():
        sd[prefix + k] = v
    return sd


def from_internlm2_state_dict(sd: dict, cfg: InternLMConfig) -> dict:
    """Upstream's keys -> ours (q/k/v split out of `wqkv`); a dict already in our names passes."""
    if not any(".attention.wqkv." in k or k.startswith("model.tok_embeddings.") for k in sd):
        return sd
    key_map = checkpoint_key_map(cfg)
    out = {}
    for key, t in sd.items():
        name = key_map(key)
        if isinstance(name, SplitKey):
            out.update(zip(name.names, name.split(t)))
        else:
            out[name] = t
    return out


def checkpoint_options(cfg: InternLMConfig) -> dict:
    """`load_checkpoint_into` options for a config's family: InternLM2's key map (and its inverse,
    so errors name missing tensors by upstream key); nothing for v1, whose keys are ours."""
    if cfg.family != "internlm2":
        return {}
    return {"key_map": checkpoint_key_map(cfg), "checkpoint_name": upstream_name}


_KEEP = "config"


def apply_overrides(cfg: InternLMConfig, *, rope_scaling=_KEEP, rope_scaling_factor: float | None = None,
                    max_context: int | None = None) -> InternLMConfig:
    """`cfg` with the loader's `rope_scaling=` / `rope_scaling_factor=` applied (InternLM2 only);
    `max_context` is checked here and becomes the model's context window in the loader.

    `rope_scaling_factor` alone keeps the config's scaling type, or picks "dynamic" (NTK, what
    LMDeploy's `rope_scaling_factor` means) when the config has none."""
    if max_context is not None and (not isinstance(max_context, int) or isinstance(max_context, bool)
                                    or max_context < 2):
        raise ValueError(f"max_context={max_context!r} must be an integer >= 2 (tokens of prompt plus reply)")
    if rope_scaling is _KEEP and rope_scaling_factor is None:
        return cfg
    if not isinstance(cfg, InternLM2Config):
        raise ValueError("rope_scaling / rope_scaling_factor apply to InternLM2 checkpoints; this InternLM v1 "
                         "config scales its rotary embedding through config.json's `rotary` field")
    scaling = cfg.rope_scaling if rope_scaling is _KEEP else rope_scaling
    if isinstance(scaling, str):
        scaling = {"type": scaling, "factor": rope_scaling_factor or 1.0}
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling={rope_scaling!r}: pass None, 'dynamic', 'linear' or "
                         f"{{'type': 'dynamic' | 'linear', 'factor': f}}")
    if rope_scaling_factor is not None:
        if isinstance(rope_scaling_factor, bool) or not isinstance(rope_scaling_factor, (int, float))                 or not rope_scaling_factor >= 1.0:
            raise ValueError(f"rope_scaling_factor={rope_scaling_factor!r} must be a number >= 1")
        kind = (scaling or {}).get("type", (scaling or {}).get("rope_type", "dynamic"))
        scaling = {"type": kind, "factor": float(rope_scaling_factor)}
    return dataclasses.replace(cfg, rope_scaling=dict(scaling) if scaling is not None else None)


__all__ = ["checkpoint_options", "apply_overrides", "split_wqkv", "pack_wqkv", "checkpoint_key_map", "upstream_name", "to_internlm2_state_dict",
           "from_internlm2_state_dict"]
