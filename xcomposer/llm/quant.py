"""8-bit and 4-bit weights through bitsandbytes: the seeds' `load_in_8bit=True` / `load_in_4bit=True`.

The words mean what they mean in transformers' `BitsAndBytesConfig` (read from transformers'
`utils/quantization_config.py` and `integrations/bitsandbytes.py`; docs/quantization.md):

- `load_in_8bit`: LLM.int8() (`bnb.nn.Linear8bitLt`, no fp16 copy kept, outlier threshold 6.0);
- `load_in_4bit`: a bare flag is **fp4** with float32 compute and no double quantization;
  `bnb_4bit_quant_type="nf4"`, `bnb_4bit_compute_dtype`, `bnb_4bit_use_double_quant` change that
  (`bnb.nn.Linear4bit`, blocks of 64);
- the output head (`lm_head` / upstream's `output`) and the embeddings stay in 16-bit, as
  transformers' default skip list keeps the output embeddings.

Only the decoder's projections (q, k, v, o, gate, up, down) are quantized; XComposer2's Partial
LoRA, the vision tower and the projector stay in the load dtype unless `quantize_vision=True`
(the tower's linears, not the projector's). Quantized projections are never packed by
`fuse_projections` (decoder.packable).

Loading: the checkpoint is read in the load dtype with the projection weights kept on the CPU,
then each projection is quantized as it moves to the target device, so the GPU never holds a
16-bit copy; the CPU holds the 16-bit projections until they are quantized (about 13 GiB for a
7B model; transformers quantizes tensor by tensor instead).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["BnbQuantization", "QuantizationError", "resolve_quantization", "quantize_model_",
           "linear_weight_bytes", "model_weight_bytes", "is_projection_weight", "quantized_target", "vision_linears",
           "checkpoint_quantization", "planned_quantization", "prepare_packed_kernels", "OnDevice", "quantized_linears",
           "describe_quantization"]


class QuantizationError(ValueError):
    """A quantization option that cannot be honoured; the message names the option and the fix."""


_METHODS = ("int8", "nf4", "fp4")
_FLOATS = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
# bitsandbytes' 4-bit block size (Linear4bit / Params4bit default) and the nested block of double quantization
BLOCK_4BIT = 64
NESTED_BLOCK = 256
CPU_4BIT_ROWS = 32  # bitsandbytes' CPU 4-bit repacking (functional._convert_weight_packed_for_cpu, block_n)


@dataclass(frozen=True)
class BnbQuantization:
    """One bitsandbytes setting. `method` "int8" (LLM.int8()), "nf4" or "fp4"."""

    method: str
    compute_dtype: torch.dtype | None = torch.float32  # 4-bit only; transformers' default; None: the input's
    double_quant: bool = False  # 4-bit only: quantize the block scales too
    int8_threshold: float = 6.0  # int8 only: activations above it run in 16-bit (outlier columns)
    quantize_vision: bool = False  # the vision tower's linears too

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        """Bytes bitsandbytes stores for one (out, in) weight (the bias stays in the load dtype)."""
        n = in_features * out_features
        if self.method == "int8":
            return n + 4 * out_features  # int8 weight + one float32 scale per row (SCB)
        blocks = math.ceil(n / BLOCK_4BIT)
        packed = math.ceil(n / 2)
        if not self.double_quant:
            return packed + 4 * blocks + 16 * 4  # float32 absmax per block + the 16-entry code
        nested = math.ceil(blocks / NESTED_BLOCK)
        return packed + blocks + 4 * nested + 256 * 4 + 16 * 4 + 4  # uint8 absmax, its float32 scales and code, offset

    def describe(self) -> str:
        if self.method == "int8":
            return f"bitsandbytes int8 (LLM.int8(), threshold {self.int8_threshold:g})"
        dt = str(self.compute_dtype).replace("torch.", "") if self.compute_dtype is not None else "input dtype"
        return (f"bitsandbytes {self.method} (blocks of {BLOCK_4BIT}, {dt} compute"
                f"{', double quantization' if self.double_quant else ''})")


def _dtype(value: Any, what: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.replace("torch.", "") in _FLOATS:
        return _FLOATS[value.replace("torch.", "")]
    raise QuantizationError(f"{what}={value!r} is not a floating dtype: give torch.float16, torch.bfloat16 or "
                            f"torch.float32 (or their names)")


def _from_config(cfg: Any) -> dict:
    """The fields of a transformers `BitsAndBytesConfig` (or a dict of them) that we honour."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    method = get("quant_method", "bitsandbytes")
    method = getattr(method, "value", method)
    if method not in (None, "bitsandbytes"):
        raise QuantizationError(f"quantization_config has quant_method={method!r}: only bitsandbytes settings are "
                                f"applied at load time (GPTQ / AWQ checkpoints carry their own config and load "
                                f"as they are)")
    if get("llm_int8_enable_fp32_cpu_offload", False):
        raise QuantizationError("llm_int8_enable_fp32_cpu_offload=True is not supported: load the model on one device")
    if get("llm_int8_has_fp16_weight", False):
        raise QuantizationError("llm_int8_has_fp16_weight=True keeps a 16-bit copy for training; for inference "
                                "leave it False")
    skip = get("llm_int8_skip_modules", None)
    if skip:
        raise QuantizationError(f"llm_int8_skip_modules={skip!r}: the output head and embeddings are never "
                                f"quantized here and the projections always are; drop the option")
    out = {"load_in_8bit": bool(get("load_in_8bit", False)), "load_in_4bit": bool(get("load_in_4bit", False))}
    # a BitsAndBytesConfig fills every field with its default: read only those of the chosen width
    keys = ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant") if out["load_in_4bit"] \
        else ("llm_int8_threshold",) if out["load_in_8bit"] else ()
    for key in keys:
        if get(key, None) is not None:
            out[key] = get(key)
    return out


def resolve_quantization(*, load_in_8bit: bool = False, load_in_4bit: bool = False, quantization: Any = None,
                         quantization_config: Any = None, bnb_4bit_quant_type: str | None = None,
                         bnb_4bit_compute_dtype: Any = None, bnb_4bit_use_double_quant: bool | None = None,
                         llm_int8_threshold: float | None = None,
                         quantize_vision: bool = False) -> BnbQuantization | None:
    """One `BnbQuantization` from the ways users say it, or None for 16-bit weights.

    `quantization` is "int8", "nf4" or "fp4" (or a `BnbQuantization`): 4-bit then computes in the
    load dtype (bitsandbytes' `compute_dtype=None`) and nf4 double-quantizes, unless the `bnb_4bit_*`
    words say otherwise; `quantization_config` a
    transformers `BitsAndBytesConfig` or a dict with its field names; the flags are transformers'
    `from_pretrained` words. Contradictions are errors, not guesses."""
    if isinstance(quantization, BnbQuantization):
        return dataclasses.replace(quantization, quantize_vision=quantization.quantize_vision or quantize_vision)
    fields = {"load_in_8bit": bool(load_in_8bit), "load_in_4bit": bool(load_in_4bit)}
    if quantization_config is not None:
        from_cfg = _from_config(quantization_config)
        for k, v in from_cfg.items():
            if k in fields and v:
                fields[k] = True
            elif k not in fields:
                fields[k] = v
    given = {"bnb_4bit_quant_type": bnb_4bit_quant_type, "bnb_4bit_compute_dtype": bnb_4bit_compute_dtype,
             "bnb_4bit_use_double_quant": bnb_4bit_use_double_quant, "llm_int8_threshold": llm_int8_threshold}
    for k, v in given.items():
        if v is not None:
            if k in fields and fields[k] != v:
                raise QuantizationError(f"{k}={v!r} contradicts quantization_config's {fields[k]!r}: give it once")
            fields[k] = v
    ours = quantization is not None  # our own word: 4-bit computes in the load dtype, nf4 double-quantizes
    if quantization is not None:
        if not isinstance(quantization, str) or quantization.lower() not in _METHODS + ("none", "4bit", "8bit"):
            raise QuantizationError(f"quantization={quantization!r}: choose one of {', '.join(_METHODS)} "
                                    f"(bitsandbytes int8 or 4-bit nf4 / fp4), or leave it unset for 16-bit weights")
        q = {"4bit": "fp4", "8bit": "int8"}.get(quantization.lower(), quantization.lower())
        if q != "none":
            if q == "int8":
                fields["load_in_8bit"] = True
            else:
                fields["load_in_4bit"] = True
                if fields.get("bnb_4bit_quant_type", q) != q:
                    raise QuantizationError(f"quantization={quantization!r} contradicts "
                                            f"bnb_4bit_quant_type={fields['bnb_4bit_quant_type']!r}: give one")
                fields["bnb_4bit_quant_type"] = q
    if fields["load_in_8bit"] and fields["load_in_4bit"]:
        raise QuantizationError("load_in_8bit and load_in_4bit were both asked for: choose one (8-bit LLM.int8() "
                                "or 4-bit nf4/fp4)")
    four_bit_opts = [k for k in ("bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant")
                     if fields.get(k) is not None]
    if not fields["load_in_8bit"] and not fields["load_in_4bit"]:
        if four_bit_opts or fields.get("llm_int8_threshold") is not None or quantize_vision:
            opts = four_bit_opts + (["llm_int8_threshold"] if fields.get("llm_int8_threshold") is not None else []) \
                + (["quantize_vision"] if quantize_vision else [])
            raise QuantizationError(f"{', '.join(opts)} given without load_in_4bit=True / load_in_8bit=True "
                                    f"(or quantization=...): say which quantization to use")
        return None
    if fields["load_in_8bit"]:
        if four_bit_opts:
            raise QuantizationError(f"{', '.join(four_bit_opts)} apply to 4-bit loading, but load_in_8bit=True was "
                                    f"asked for")
        threshold = fields.get("llm_int8_threshold", 6.0)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold < 0:
            raise QuantizationError(f"llm_int8_threshold={threshold!r} must be a finite number >= 0 (default 6.0; "
                                    f"0 turns the 16-bit outlier path off)")
        return BnbQuantization("int8", compute_dtype=None, int8_threshold=float(threshold),
                               quantize_vision=quantize_vision)
    kind = fields.get("bnb_4bit_quant_type") or "fp4"
    if kind not in ("nf4", "fp4"):
        raise QuantizationError(f"bnb_4bit_quant_type={kind!r}: bitsandbytes' 4-bit types are 'nf4' and 'fp4'")
    double = fields.get("bnb_4bit_use_double_quant")
    if double is not None and not isinstance(double, bool):
        raise QuantizationError(f"bnb_4bit_use_double_quant={double!r} must be True or False")
    if double is None and ours:
        double = kind == "nf4"
    compute = _dtype(fields.get("bnb_4bit_compute_dtype"), "bnb_4bit_compute_dtype")
    if compute is None and not ours:
        compute = torch.float32  # transformers' BitsAndBytesConfig default
    return BnbQuantization(kind, compute_dtype=compute, double_quant=bool(double), quantize_vision=quantize_vision)


@dataclass(frozen=True)
class OnDevice:
    """A GPTQ / AWQ spec as the planner should count it on `device`: the bytes a layer holds there
    while running (`PackedSpec.runtime_bytes`: the CUDA int4 kernel keeps its own copy and sends the
    stored tensors to host memory)."""

    spec: Any
    device: str
    quantize_vision = False

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        return int(self.spec.runtime_bytes(in_features, out_features, self.device))

    def describe(self) -> str:
        return self.spec.describe()


def checkpoint_quantization(folder, q: "BnbQuantization | None"):
    """The folder's own GPTQ / AWQ spec (None for a 16-bit checkpoint), refusing bitsandbytes
    options on a folder that is quantized already."""
    from .packed_quant import read_packed_quantization
    packed = read_packed_quantization(folder)
    if packed is not None and q is not None:
        raise QuantizationError(f"this checkpoint is quantized already ({packed.describe()}): load it without "
                                f"load_in_8bit / load_in_4bit / quantization (and without --load-in-4bit, "
                                f"--quantization), or quantize the 16-bit checkpoint instead")
    return packed


def planned_quantization(q: Any, packed: Any, device: torch.device) -> Any:
    """What memory checks count for a load: bitsandbytes' setting, or the packed spec as it runs on
    `device`."""
    if packed is not None:
        return OnDevice(packed, str(device))
    return q


@torch.no_grad()
def prepare_packed_kernels(model: nn.Module) -> None:
    """Choose every GPTQ / AWQ linear's kernel now, on its device (the CUDA int4 kernel builds its
    copy and the stored tensors go to host memory), so memory is settled before a KV pool is sized
    from what is free and before any CUDA graph capture."""
    from .packed_quant import packed_linears
    for m in packed_linears(model):
        m.prepare()


def describe_quantization(q: Any) -> str:
    return "16-bit weights" if q is None else q.describe()


# -- which weights ------------------------------------------------------------------------------
_PROJ = re.compile(r"(^|\.)model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
_PROJ_NAMES = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def quantized_target(device: torch.device, q: Any):
    """The loader's `device` for a model quantized after loading: the projection weights stay on
    the CPU (quantized as they move), everything else goes straight to `device`."""
    if q is None:
        return device
    return lambda name: torch.device("cpu") if is_projection_weight(name) else device


def is_projection_weight(name: str) -> bool:
    """True for the weight of a decoder projection (what the quantized load keeps on the CPU until
    it is quantized), by its model name, with or without a prefix such as `llm.`."""
    return bool(_PROJ.search(name))


def _decoder(model: nn.Module) -> nn.Module:
    return model.llm if hasattr(model, "llm") and hasattr(model.llm, "model") else model


def vision_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of the vision tower's linears that are called as modules: a
    timm EVA block's fused qkv (its parent holds q_bias / v_bias and reads `qkv.weight` directly)
    stays in 16-bit."""
    tower = getattr(model, "vision", None) or getattr(model, "vit", None)
    if tower is None:
        raise QuantizationError("quantize_vision=True applies to XComposer models (a vision tower); this is a "
                                "text model: drop the option")
    for parent in tower.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear) and type(child) is nn.Linear and not hasattr(parent, "q_bias"):
                yield parent, attr, child


def _targets(model: nn.Module, q: BnbQuantization) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(name, parent, attribute, linear) of every linear `q` quantizes."""
    llm = _decoder(model)
    out = []
    for i, layer in enumerate(llm.model.layers):
        for sub, attr in _PROJ_NAMES:
            parent = getattr(layer, sub)
            lin = getattr(parent, attr)
            if lin is None:
                raise QuantizationError("the decoder's projections are packed (fuse_projections ran): quantize "
                                        "before fusing (from_pretrained does)")
            out.append((f"layer {i} {sub}.{attr}", parent, attr, lin))
    if q.quantize_vision:
        out.extend((f"vision {type(parent).__name__}.{attr}", parent, attr, lin)
                   for parent, attr, lin in vision_linears(model))
    return out


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise QuantizationError("8-bit / 4-bit loading needs bitsandbytes: pip install 'bitsandbytes>=0.48'") from e
    return bnb


def _check_device(device: torch.device) -> None:
    if device.type not in ("cpu", "cuda"):
        raise QuantizationError(f"bitsandbytes quantization runs on CPUs and CUDA GPUs here, not on {device}: load "
                                f"on cuda or cpu, or without load_in_8bit / load_in_4bit")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (5, 0):
            raise QuantizationError(f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                                    f"is older than bitsandbytes' kernels support (5.0+): load in 16-bit, or on the CPU")


def _quantized(lin: nn.Linear, q: BnbQuantization, device: torch.device, name: str) -> nn.Module:
    bnb = _bnb()
    if q.method != "int8" and device.type == "cpu" and (lin.out_features % CPU_4BIT_ROWS or lin.in_features % 2):
        # bitsandbytes' CPU 4-bit kernel repacks weights in groups of 32 rows (AVX512-BF16 CPUs)
        raise QuantizationError(f"{name} is {lin.out_features} x {lin.in_features}: bitsandbytes' 4-bit CPU kernel "
                                f"needs a multiple of {CPU_4BIT_ROWS} output features and an even input size; "
                                f"load it on a GPU, in 8-bit, or in 16-bit")
    # bitsandbytes quantizes a weight when it moves off the CPU (Int8Params only then)
    w = lin.weight.detach().to("cpu")
    bias = lin.bias.detach().to(device) if lin.bias is not None else None
    if q.method == "int8":
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias is not None, has_fp16_weights=False,
                                  threshold=q.int8_threshold, device="meta")
        new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias is not None,
                                compute_dtype=q.compute_dtype, compress_statistics=q.double_quant,
                                quant_type=q.method, device="meta")
        new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=q.method,
                                       compress_statistics=q.double_quant, blocksize=BLOCK_4BIT)
    if bias is not None:
        new.bias = nn.Parameter(bias, requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes on the move


@torch.no_grad()
def quantize_model_(model: nn.Module, q: BnbQuantization, device: torch.device | str) -> nn.Module:
    """Replace the decoder's projections (and with `quantize_vision` the tower's linears) of a loaded
    model by bitsandbytes modules on `device`, one at a time, then move the rest to `device`."""
    device = torch.device(device)
    _check_device(device)
    targets = _targets(model, q)
    for name, parent, attr, lin in targets:
        setattr(parent, attr, _quantized(lin, q, device, name))
        del lin
    model.quantization = q
    llm = _decoder(model)
    llm.quantization = q
    return model


def quantized_linears(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes modules of a model (what tests and memory reports count)."""
    bnb = _bnb()
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]


# -- bytes, for planning --------------------------------------------------------------------------
def linear_weight_bytes(in_features: int, out_features: int, dtype: torch.dtype, q: Any) -> int:
    """Stored bytes of one projection weight: `q.weight_bytes` when quantized (bitsandbytes' or a
    GPTQ / AWQ spec's), else the load dtype's."""
    if q is None:
        return in_features * out_features * torch.empty(0, dtype=dtype).element_size()
    return int(q.weight_bytes(in_features, out_features))


def model_weight_bytes(model: nn.Module, dtype: torch.dtype, q: Any = None) -> int:
    """Bytes of every parameter of a (meta-device) model once loaded in `dtype` with `q`: the decoder
    projections (and with `quantize_vision` the tower's linears) at their quantized size."""
    elem = torch.empty(0, dtype=dtype).element_size()
    total = sum(p.numel() for p in model.parameters()) * elem
    if q is None:
        return total
    if isinstance(q, BnbQuantization):
        lins = [lin for _, _, _, lin in _targets(model, q)]
    else:
        lins = [getattr(getattr(layer, sub), attr) for layer in _decoder(model).model.layers
                for sub, attr in _PROJ_NAMES]
    for lin in lins:
        total += linear_weight_bytes(lin.in_features, lin.out_features, dtype, q) \
            - lin.in_features * lin.out_features * elem
    return total
