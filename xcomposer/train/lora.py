"""peft LoRA on our decoder, and adapters written in upstream's module names.

InternLM2's upstream LoRA sits on the fused `attention.wqkv` (one A of (r, hidden) shared by q, k
and v; one B of (rows of wqkv, r)). Three LoRAs on our q/k/v would be a different (rank 3r,
block-diagonal) parameterisation, so for training each attention's q/k/v are packed into one plain
`nn.Linear` (`QKV.wqkv`, rows in our q | k | v order) that peft wraps: the trained adapter has
upstream's shapes and parameter count. On saving, B's rows are permuted into wqkv's kv-group layout
(`pack_wqkv`) and every module is renamed to upstream's (llm/adapter.py holds the map).
InternLM v1's tree is upstream's already (q/k/v/o/gate/up/down), so it trains and saves as is.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..llm.adapter import CONFIG_FILE, DEFAULT_TARGETS, PEFT_PREFIX, WEIGHTS_FILE, module_map
from ..llm.internlm2 import pack_wqkv

# upstream module -> the module path peft wraps in the training model (InternLM2)
_TRAIN_NAMES = {"attention.wqkv": "self_attn.qkv_proj.wqkv", "attention.wo": "self_attn.o_proj",
                "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                "feed_forward.w2": "mlp.down_proj"}


class QKV(nn.Module):
    """q/k/v as one linear map for training; Attention.forward uses it as its fused `qkv_proj`."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
        super().__init__()
        self.sizes = (q.out_features, k.out_features, v.out_features)
        self.wqkv = nn.Linear(q.in_features, sum(self.sizes), bias=q.bias is not None,
                              device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            self.wqkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                self.wqkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wqkv(x)

    def split(self, y: torch.Tensor):
        return y.split(self.sizes, dim=-1)


def check_targets(targets, family: str) -> list[str]:
    known = sorted(module_map_for(family))
    bad = [t for t in targets if t not in known]
    if bad or not targets:
        raise ValueError(f"LoRA target modules {bad or targets} unknown for this model: use upstream's names, "
                         f"some of {known}")
    return list(targets)


def module_map_for(family: str) -> dict[str, str]:
    from ..llm.adapter import INTERNLM2_MODULES, V1_MODULES
    return INTERNLM2_MODULES if family == "internlm2" else V1_MODULES


def pack_qkv_for_training(model) -> None:
    """Replace each attention's q/k/v (plain, unfused) by one `QKV` (InternLM2 only)."""
    if model.fused is not None:
        model.unfuse_projections()
    for layer in model.model.layers:
        attn = layer.self_attn
        if attn.qkv_proj is None:
            attn.qkv_proj = QKV(attn.q_proj, attn.k_proj, attn.v_proj)
            attn.q_proj = attn.k_proj = attn.v_proj = None


# the base projections of a training model, by family (InternLM2's q/k/v packed into one `QKV.wqkv`)
_BASE_LINEARS = {"internlm2": ("self_attn.qkv_proj.wqkv", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                               "mlp.down_proj"),
                 "internlm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@torch.no_grad()
def quantize_base_(model, quantization) -> None:
    """QLoRA: every base projection of the (packed) training model becomes a bitsandbytes module on
    the model's device (`llm/quant.py`'s conversion, NF4 with double quantization for `nf4`); peft then
    puts its LoRA on those modules (its bitsandbytes LoRA layers)."""
    from ..llm.quant import _check_device, _quantized

    device = model.device
    _check_device(device)
    for i, layer in enumerate(model.model.layers):
        for path in _BASE_LINEARS[model.config.family]:
            *parents, attr = path.split(".")
            parent = layer
            for name in parents:
                parent = getattr(parent, name)
            setattr(parent, attr, _quantized(getattr(parent, attr), quantization, device, f"layer {i} {path}"))
    model.quantization = quantization
    # what transformers marks on a bitsandbytes model: peft then wraps the projections in its own
    # bitsandbytes LoRA layers (lora.bnb.Linear4bit / Linear8bitLt), as for a transformers QLoRA model
    model.is_loaded_in_4bit = quantization.method in ("nf4", "fp4")
    model.is_loaded_in_8bit = quantization.method == "int8"


def lora_model(model, targets: list[str], r: int, alpha: float, dropout: float, quantization=None):
    """peft's LoRA on `model` (frozen): returns the PeftModel; only lora_A / lora_B train. With
    `quantization` (a `BnbQuantization`: QLoRA) the base projections are quantized first."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a test/train dependency
        raise ImportError("fine-tuning needs peft: pip install 'peft>=0.10'") from e
    family = model.config.family
    targets = check_targets(targets, family)
    if family == "internlm2":
        pack_qkv_for_training(model)
        names = [_TRAIN_NAMES[t] for t in targets]
    else:
        names = targets
    if quantization is not None:
        quantize_base_(model, quantization)
    model.requires_grad_(False)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    return get_peft_model(model, config)


def upstream_adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA tensors under upstream's names (`base_model.model.model.layers.N.attention.wqkv.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    base = peft_model.get_base_model()
    cfg = base.config
    ours_to_upstream = {v: k for k, v in _TRAIN_NAMES.items()} if cfg.family == "internlm2" else \
        {v: k for k, v in module_map(cfg).items()}
    q_rows, kv_rows = cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {}
    for key, t in get_peft_model_state_dict(peft_model).items():
        assert key.startswith(PEFT_PREFIX), key
        name = key[len(PEFT_PREFIX):]  # model.layers.N.<ours>.lora_X.weight
        head, ab = name.rsplit(".lora_", 1)
        layer, _, module = head.partition(".")[2].partition(".")[2].partition(".")  # N, <ours>
        upstream = ours_to_upstream[module]
        t = t.detach().to("cpu", torch.float32).contiguous()
        if upstream == "attention.wqkv" and ab.startswith("B"):  # our q | k | v rows -> wqkv's kv groups
            t = pack_wqkv(*t.split([q_rows, kv_rows, kv_rows]), cfg).contiguous()
        out[f"{PEFT_PREFIX}model.layers.{layer}.{upstream}.lora_{ab}"] = t
    return out


def save_adapter(peft_model, out: str | Path, base_name: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in peft's format with upstream's
    module names, loadable by `PeftModel.from_pretrained` on upstream's remote-code model and by
    `InternLM.from_pretrained(folder, adapter=out)`."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = peft_model.get_base_model()
    trained = peft_model.peft_config["default"]
    family = base.config.family
    upstream_targets = sorted({({v: k for k, v in _TRAIN_NAMES.items()}.get(t, t) if family == "internlm2" else t)
                               for t in trained.target_modules})
    config = LoraConfig(r=trained.r, lora_alpha=trained.lora_alpha, lora_dropout=trained.lora_dropout,
                        target_modules=upstream_targets, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_name)
    config.save_pretrained(str(out))
    save_file(upstream_adapter_state(peft_model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    assert (out / CONFIG_FILE).is_file()
    return out


def default_targets(family: str) -> list[str]:
    return list(DEFAULT_TARGETS[family])


__all__ = ["QKV", "lora_model", "quantize_base_", "save_adapter", "upstream_adapter_state", "default_targets", "pack_qkv_for_training"]
