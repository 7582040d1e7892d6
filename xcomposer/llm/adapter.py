"""LoRA adapters in peft's format, named for upstream's module tree, merged into our decoder.

A peft adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`) with keys `base_model.model.<module>.lora_A.weight` (r, in) and
`...lora_B.weight` (out, r), where `<module>` is a path in *upstream's* model: for InternLM2
`model.layers.N.attention.wqkv`, `attention.wo`, `feed_forward.w1/w2/w3` (upstream XComposer's
finetune.py targets), for InternLM v1 `model.layers.N.self_attn.q_proj` ... (our v1 tree is
upstream's). This file is the one owner of that name map: the trainer (xcomposer.train) writes
adapters with it and `InternLM.from_pretrained(adapter=PATH)` reads them with it.

Loading merges each LoRA into its base weight, W += scale * B @ A with scale = lora_alpha / r
(lora_alpha / sqrt(r) with `use_rslora`), before the projections are fused or quantized, so the
decoder stays plain. A LoRA on InternLM2's `wqkv` has B rows in wqkv's kv-group layout; they are
split into our q/k/v rows with `split_wqkv` (the same split the checkpoint loader uses).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .config import InternLMConfig

PEFT_PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
# beside the LoRA, what `finetune --train-vision / --train-projector` trained in full: the tower's and the
# projector's tensors under upstream's checkpoint keys (`vit.*`, `vision_proj.*`); not part of peft's format
VISION_FILE = "vision_trainables.safetensors"

# upstream module (inside a layer) -> our module, InternLM2
INTERNLM2_MODULES = {"attention.wqkv": "self_attn.qkv", "attention.wo": "self_attn.o_proj",
                     "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                     "feed_forward.w2": "mlp.down_proj"}
V1_MODULES = {f"{p}.{n}": f"{p}.{n}" for p, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                                      ("mlp", ("gate_proj", "up_proj", "down_proj")))
              for n in names}
# upstream's finetune.py defaults (XComposer2+ on InternLM2; XComposer 1.0 on InternLM v1)
DEFAULT_TARGETS = {"internlm2": ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                 "feed_forward.w3"],
                   "internlm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter folder that cannot be applied to this model; the message says why and the fix."""


def module_map(cfg: InternLMConfig) -> dict[str, str]:
    return INTERNLM2_MODULES if cfg.family == "internlm2" else V1_MODULES


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors with the `base_model.model.` prefix removed)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter {str(folder)!r} is not a folder: give the folder holding {CONFIG_FILE} and "
                           f"{WEIGHTS_FILE}")
    if not (folder / CONFIG_FILE).is_file():
        raise AdapterError(f"adapter folder {str(folder)!r} has no {CONFIG_FILE}: is it a peft LoRA adapter?")
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    if (folder / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file
        raw = load_file(str(folder / WEIGHTS_FILE))
    elif (folder / WEIGHTS_BIN).is_file():
        raw = torch.load(folder / WEIGHTS_BIN, map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"adapter folder {str(folder)!r} has neither {WEIGHTS_FILE} nor {WEIGHTS_BIN}")
    return config, {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in raw.items()}


def _check_config(config: dict, where: str) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r}; only LoRA adapters load here")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if config.get(key) == bad:
            raise AdapterError(f"{where}: {key}={bad} is not supported yet: train a plain LoRA adapter")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={config['bias']!r} (trained biases) is not supported yet: use bias='none'")
    if config.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save {config['modules_to_save']} (fully trained modules) is not "
                           f"supported yet")


def _pattern_value(pattern: dict, module: str, default):
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def adapter_pairs(path: str | Path, cfg: InternLMConfig) -> list[tuple[int, str, torch.Tensor, torch.Tensor]]:
    """The adapter's LoRAs, checked against `cfg`: (layer, our module, A (r, in), scale * B (out, r)),
    fp32; for InternLM2's `wqkv` our module is "self_attn.qkv" and B's rows are already in our
    q | k | v order."""
    from .internlm2 import split_wqkv

    where = f"adapter {str(path)!r}"
    config, tensors = read_adapter(path)
    _check_config(config, where)
    modules = module_map(cfg)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"{where}: unexpected tensor {PEFT_PREFIX + key!r}; expected "
                               f"{PEFT_PREFIX}model.layers.N.<module>.lora_A/lora_B.weight")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in modules:
            family = "InternLM2" if cfg.family == "internlm2" else "InternLM v1"
            raise AdapterError(f"{where}: LoRA on {module!r}, which a {family} model does not have (its modules: "
                               f"{sorted(modules)}): was it trained on another base model?")
        if layer >= cfg.num_hidden_layers:
            raise AdapterError(f"{where}: LoRA on layer {layer} but the model has {cfg.num_hidden_layers} layers: "
                               f"was it trained on another base model?")
        pairs.setdefault((layer, module), {})[ab] = t
    if not pairs:
        raise AdapterError(f"{where}: no LoRA tensors in the weights file")
    h, kv = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
    out = []
    out_in = {"self_attn.qkv": (h + 2 * kv, h), "attention.wqkv": (h + 2 * kv, h), "self_attn.q_proj": (h, h),
              "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (cfg.intermediate_size, h), "mlp.up_proj": (cfg.intermediate_size, h),
              "mlp.down_proj": (h, cfg.intermediate_size)}
    for (layer, module), ab in sorted(pairs.items()):
        name = f"model.layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: {name} has lora_{''.join(ab)} but not lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"].float(), ab["B"].float()
        r = a.shape[0]
        expect_r = _pattern_value(config.get("rank_pattern"), module, config.get("r", r))
        if b.shape[1] != r or r != expect_r:
            raise AdapterError(f"{where}: {name} has rank {r} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) but "
                               f"adapter_config.json says r={expect_r}")
        ours = modules[module]
        want = out_in[ours]
        if (b.shape[0], a.shape[1]) != want:
            raise AdapterError(f"{where}: {name} maps {a.shape[1]} -> {b.shape[0]} features but this model's "
                               f"{module} maps {want[1]} -> {want[0]}: was it trained on another base model?")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if ours == "self_attn.qkv":  # wqkv's kv-group rows -> our q | k | v
            b = torch.cat(split_wqkv(b, cfg))
        out.append((layer, ours, a, scale * b))
    return out


def adapter_deltas(path: str | Path, cfg: InternLMConfig) -> dict[str, torch.Tensor]:
    """Weight deltas scale * B @ A (fp32) keyed by our parameter names (`...q_proj.weight` ...)."""
    h, kv = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
    deltas = {}
    for layer, ours, a, b in adapter_pairs(path, cfg):
        delta, base = b @ a, f"model.layers.{layer}."
        if ours == "self_attn.qkv":  # rows already q | k | v
            for part, d in zip("qkv", delta.split([h, kv, kv])):
                deltas[f"{base}self_attn.{part}_proj.weight"] = d
        else:
            deltas[f"{base}{ours}.weight"] = delta
    return deltas


# our module -> the decoder's task-LoRA slot it feeds, and the rows of that slot's output it covers
_SLOTS = {"self_attn.qkv": ("self_attn", "qkv_task"), "self_attn.q_proj": ("self_attn", "qkv_task"),
          "self_attn.k_proj": ("self_attn", "qkv_task"), "self_attn.v_proj": ("self_attn", "qkv_task"),
          "self_attn.o_proj": ("self_attn", "o_task"), "mlp.gate_proj": ("mlp", "gate_task"),
          "mlp.up_proj": ("mlp", "up_task"), "mlp.down_proj": ("mlp", "down_task")}


@torch.no_grad()
def attach_adapter_(llm, name: str, path: str | Path) -> str:
    """Hold an adapter beside the weights as the decoder's task LoRA `name` (selected per request:
    `forward(..., task_loras=(name,))`, the engine's per-row masks), instead of merging it. InternLM
    v1's separate q / k / v LoRAs become one LoRA on the packed q | k | v output: their A's stacked,
    their B's block-diagonal, which is the same sum. Returns a note for load_notes."""
    from .decoder import PartialLoRA, TaskLoRA

    if (Path(path) / VISION_FILE).is_file():
        raise AdapterError(f"adapter {str(path)!r} also trained the vision tower or projector ({VISION_FILE}): adapters "
                           f"held beside the weights share the base's tower, so serve it alone, loaded with "
                           f"from_pretrained(adapter=...) (web_demo.py --adapter does), not with serve --adapter")
    if not name.isidentifier() or name in getattr(llm, "task_lora_names", ()):
        raise AdapterError(f"adapter name {name!r}: use a new name of letters, digits and underscores "
                           f"(taken: {list(getattr(llm, 'task_lora_names', ()))})")
    cfg = llm.config
    h, kv = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
    rows = {"self_attn.q_proj": (0, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h + kv, kv)}
    per_slot: dict[tuple[int, str, str], list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for layer, ours, a, b in adapter_pairs(path, cfg):
        parent, slot = _SLOTS[ours]
        per_slot.setdefault((layer, parent, slot), []).append((ours, a, b))
    dev, dt = llm.device, llm.dtype
    for (layer, parent, slot), parts in per_slot.items():
        owner = getattr(llm.model.layers[layer], parent)
        out_f = h + 2 * kv if slot == "qkv_task" else parts[0][2].shape[0]
        in_f = parts[0][1].shape[1]
        a = torch.cat([p[1] for p in parts])  # (sum r, in)
        b = torch.zeros(out_f, a.shape[0])
        col = 0
        for ours, pa, pb in parts:  # a fused wqkv LoRA covers every row; v1's q/k/v their own block
            start, n = rows.get(ours, (0, out_f))
            b[start:start + n, col:col + pa.shape[0]] = pb
            col += pa.shape[0]
        task = getattr(owner, slot, None)
        if task is None:
            task = TaskLoRA(in_f, out_f, {}, llm.task_state).to(dev, dt)
            setattr(owner, slot, task)
        lora = PartialLoRA(in_f, a.shape[0], out_f).to(dev, dt)
        lora.A.weight.copy_(a)
        lora.B.weight.copy_(b)
        lora.requires_grad_(False)
        task.loras[name] = lora
    llm.task_lora_names = tuple(llm.task_lora_names) + (name,)
    return f"LoRA adapter {Path(path).name} held as {name!r} ({len(per_slot)} projections), chosen per request"


@torch.no_grad()
def merge_adapter_(model, path: str | Path) -> str:
    """Add an adapter's deltas into an unfused float model's weights, in place; a note for load_notes."""
    deltas = adapter_deltas(path, model.config)
    params = dict(model.named_parameters())
    for name, delta in deltas.items():
        p = params.get(name)
        if p is None or not p.is_floating_point():
            raise AdapterError(f"adapter {str(path)!r}: cannot merge into {name}: the model holds no float weight "
                               f"there (fused or quantized projections: merge before fusing or quantizing)")
        p.add_(delta.to(p.device, p.dtype))
    config = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    return (f"LoRA adapter {Path(path).name} merged (r {config.get('r')}, alpha {config.get('lora_alpha')}, "
            f"{len(deltas)} weights)")


__all__ = ["AdapterError", "read_adapter", "adapter_pairs", "adapter_deltas", "merge_adapter_", "attach_adapter_", "module_map", "DEFAULT_TARGETS",
           "INTERNLM2_MODULES", "V1_MODULES", "PEFT_PREFIX"]
