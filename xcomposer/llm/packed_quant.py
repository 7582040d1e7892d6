"""GPTQ and AWQ checkpoints: the folder's quantization spec, modules that hold the packed tensors as
they are stored, and the loading plan that routes `*.qweight/qzeros/scales/g_idx` into them.

Formats (facts and sources: docs/checkpoint-format.md, "GPTQ and AWQ checkpoints"; the layouts and
kernels: docs/quantization-formats.md):

* GPTQ (auto_gptq / gptqmodel; `quant_method` "gptq" in config.json's `quantization_config`, or a
  `quantize_config.json`): per linear `qweight` int32 (in * bits / 32, out), input rows packed
  little-end first; `qzeros` int32 (groups, out * bits / 32), output columns packed the same way;
  `scales` (groups, out) fp16; `g_idx` int32 (in,) the group of every input row (a permutation of
  groups under act-order, `desc_act`); optional `bias`. `checkpoint_format` "gptq" (v1) stores every
  zero point minus one, "gptq_v2" stores it as is. W[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o].
* AWQ GEMM (AutoAWQ, LMDeploy's `lite auto_awq`; `quant_method` "awq", `version` "gemm"): `qweight`
  int32 (in, out / 8), eight output columns per word in the order [0, 2, 4, 6, 1, 3, 5, 7];
  `qzeros` int32 (groups, out / 8) the same way; `scales` (groups, out); groups are consecutive
  runs of `group_size` input rows.

On the CPU a linear dequantizes its weight to the activation dtype and runs `F.linear` (exact in
fp32). On CUDA a 4-bit linear runs PyTorch's tinygemm int4 kernel (`aten._weight_int4pack_mm`, the
kernel torchao's int4 weight-only path calls) when the shapes allow and falls back to dequantizing
otherwise; `module.kernel` says which path runs and `module.kernel_note` why.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .keys import CheckpointError

QUANT_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ GEMM: slot k of a word holds output column AWQ_ORDER[k] of its 8
_AWQ_UNDO = tuple(AWQ_ORDER.index(c) for c in range(8))  # output column c sits in slot _AWQ_UNDO[c]
_TINYGEMM_GROUPS = (32, 64, 128, 256)


class PackedQuantError(CheckpointError):
    """A GPTQ / AWQ folder, config field or tensor that cannot be used; the message names it and the fix."""


# -- the spec ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedSpec:
    """How a folder's linears were quantized. `group_size` -1 means one group over all inputs."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = False
    checkpoint_format: str = "gptq"  # GPTQ: "gptq" (v1, zero points stored minus one) | "gptq_v2"; AWQ: "gemm"
    source: str = "config.json"  # where the spec was read, for messages
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    quantize_vision = False  # the memory planner asks; GPTQ / AWQ folders keep the vision tower in 16-bit

    @property
    def pack_factor(self) -> int:
        """Codes per int32 word."""
        return 32 // self.bits

    def group_count(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def check_linear(self, in_features: int, out_features: int, name: str = "a linear layer") -> None:
        """Refuse a linear whose shape this spec cannot describe (groups, packing)."""
        fix = f"the checkpoint does not match {self.source}: re-download the folder or correct its quantization config"
        if self.group_size != -1 and in_features % self.group_size:
            raise PackedQuantError(
                f"{name}: group_size={self.group_size} ({self.source}) does not divide its {in_features} input "
                f"features; GPTQ / AWQ groups are whole runs of group_size inputs: {fix}")
        if self.method == "gptq" and (in_features * self.bits) % 32:
            raise PackedQuantError(f"{name}: {in_features} input features do not fill whole int32 words at "
                                   f"{self.bits} bits; {fix}")
        if (out_features * self.bits) % 32:
            raise PackedQuantError(f"{name}: {out_features} output features do not fill whole int32 words at "
                                   f"{self.bits} bits ({self.pack_factor} per word); {fix}")

    def tensor_shapes(self, in_features: int, out_features: int) -> dict[str, tuple[int, ...]]:
        """Stored shape of each packed tensor of one linear (bias aside)."""
        g, pf = self.group_count(in_features), self.pack_factor
        if self.method == "gptq":
            return {"qweight": (in_features // pf, out_features), "qzeros": (g, out_features // pf),
                    "scales": (g, out_features), "g_idx": (in_features,)}
        return {"qweight": (in_features, out_features // pf), "qzeros": (g, out_features // pf),
                "scales": (g, out_features)}

    def weight_bytes(self, in_features: int, out_features: int) -> int:
        """Stored bytes of one quantized linear's weight: qweight, qzeros, fp16 scales and (GPTQ)
        g_idx; a bias is counted with the other parameters."""
        self.check_linear(in_features, out_features)
        size = {"qweight": 4, "qzeros": 4, "scales": 2, "g_idx": 4}
        shapes = self.tensor_shapes(in_features, out_features)
        return sum(math.prod(shape) * size[name] for name, shape in shapes.items())

    def runtime_bytes(self, in_features: int, out_features: int, device: str = "cuda") -> int:
        """Device bytes one quantized linear holds while running: `weight_bytes`, or on CUDA, where the
        int4 kernel runs, its own copy instead (codes in / 2 bytes per output, bf16 scale and zero
        pairs; the stored tensors then live in host memory)."""
        stored = self.weight_bytes(in_features, out_features)
        group = in_features if self.group_size == -1 else self.group_size
        if torch.device(device).type != "cuda" or self.bits != 4 or group not in _TINYGEMM_GROUPS \
                or in_features % 32 or out_features % 8:
            return stored
        # the stored tensors move to host memory once the kernel's copy exists (`_release_stored`)
        return in_features * out_features // 2 + self.group_count(in_features) * out_features * 2 * 2

    def describe(self) -> str:
        group = "one group" if self.group_size == -1 else f"group {self.group_size}"
        if self.method == "gptq":
            extra = (", act-order" if self.desc_act else "") + (", sym" if self.sym else ", asym")
            fmt = "v1 zero points" if self.checkpoint_format == "gptq" else "v2 zero points"
            return f"GPTQ {self.bits}-bit ({group}{extra}, {fmt}; {self.source})"
        return f"AWQ {self.bits}-bit ({group}, GEMM packing; {self.source})"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PackedQuantError(f"{path} cannot be read as JSON ({e}); re-download it") from e
    return data if isinstance(data, dict) else None


def _int_field(d: dict, names: Iterable[str], source: str, what: str) -> int:
    for n in names:
        if n in d and d[n] is not None:
            v = d[n]
            if isinstance(v, bool) or not isinstance(v, int):
                raise PackedQuantError(f"{source}: {n}={v!r} must be an integer ({what})")
            return v
    raise PackedQuantError(f"{source} has no {' / '.join(names)} field ({what}); the quantization config is "
                           f"incomplete: re-download it with the weights")


def _spec_from(source: str, d: dict) -> PackedSpec | None:
    method = str(d.get("quant_method") or d.get("method") or "").lower()
    if not method:
        method = {"quantize_config.json": "gptq", "quant_config.json": "awq"}.get(source, "")
    if method not in ("gptq", "awq"):
        return None  # not ours to load (bitsandbytes, fp8, ...)
    bits = _int_field(d, ("bits", "w_bit", "wbits"), source, "bits per weight")
    group = _int_field(d, ("group_size", "q_group_size"), source, "inputs per quantization group, -1 for one group")
    if group == 0 or group < -1:
        raise PackedQuantError(f"{source}: group_size={group} must be positive or -1 (one group over all inputs)")
    if d.get("dynamic"):
        raise PackedQuantError(f"{source} sets per-module overrides (`dynamic`), which this loader does not apply: "
                               f"use a checkpoint quantized with one bits / group_size for every layer")
    if method == "gptq":
        fmt = str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()
        if d.get("is_marlin_format"):
            fmt = "marlin"
        if fmt not in GPTQ_FORMATS:
            raise PackedQuantError(
                f"{source}: GPTQ checkpoint_format {fmt!r} is repacked for one kernel; this loader reads the portable "
                f"'gptq' (v1) and 'gptq_v2' layouts: re-export the model in the 'gptq' format (auto_gptq's default, "
                f"gptqmodel's format='gptq')")
        pack = str(d.get("pack_dtype") or "int32").replace("torch.", "").lower()
        if pack != "int32":
            raise PackedQuantError(f"{source}: pack_dtype {pack!r} is not supported; GPTQ tensors must be packed in "
                                   f"int32 words (the default): re-export with pack_dtype=torch.int32")
        if bits not in (4, 8):
            raise PackedQuantError(f"{source}: GPTQ bits={bits} is not supported; this loader reads 4-bit and 8-bit "
                                   f"GPTQ checkpoints: use a 4-bit or 8-bit export")
        return PackedSpec("gptq", bits, group, desc_act=bool(d.get("desc_act", False)), sym=bool(d.get("sym", True)),
                          checkpoint_format=fmt, source=source, raw=dict(d))
    version = str(d.get("version") or d.get("format") or "gemm").lower()
    if version != "gemm":
        raise PackedQuantError(f"{source}: AWQ version {version!r} packs its tensors for another kernel; this loader "
                               f"reads the GEMM layout (AutoAWQ's version='GEMM', what LMDeploy's `lite auto_awq` "
                               f"writes): re-export with version='GEMM'")
    if d.get("zero_point", True) is False:
        raise PackedQuantError(f"{source}: AWQ with zero_point=false (no qzeros) is not supported: use an export "
                               f"with zero points (LMDeploy's and AutoAWQ's default)")
    if bits != 4:
        raise PackedQuantError(f"{source}: AWQ bits={bits} is not supported; the GEMM layout is 4-bit only: use a "
                               f"4-bit AWQ export")
    return PackedSpec("awq", bits, group, desc_act=False, sym=False, checkpoint_format="gemm", source=source,
                      raw=dict(d))


def read_packed_quantization(folder: str | Path) -> PackedSpec | None:
    """The GPTQ / AWQ spec of a checkpoint folder, or None for an unquantized one (or one quantized by
    another method, e.g. bitsandbytes). Read from config.json's `quantization_config`, auto_gptq's
    `quantize_config.json` or AutoAWQ's `quant_config.json`; where several exist they must agree."""
    folder = Path(folder)
    found: list[tuple[str, dict]] = []
    cfg = _read_json(folder / "config.json")
    if cfg is not None and isinstance(cfg.get("quantization_config"), dict):
        found.append(("config.json quantization_config", cfg["quantization_config"]))
    for name in ("quantize_config.json", "quant_config.json"):
        d = _read_json(folder / name)
        if d is not None:
            found.append((name, d))
    specs = [s for s in (_spec_from(src, d) for src, d in found) if s is not None]
    if not specs:
        return None
    first = specs[0]
    for other in specs[1:]:
        if (other.method, other.bits, other.group_size, other.desc_act) != \
                (first.method, first.bits, first.group_size, first.desc_act):
            raise PackedQuantError(
                f"{folder}: {first.source} ({first.describe()}) and {other.source} ({other.describe()}) disagree; "
                f"the folder mixes exports: re-download it, or delete the file that does not belong")
    return first


# -- unpacking ------------------------------------------------------------------------------------

def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) int32 words -> (R * 32 / bits, C) codes: row r * pf + j sits at bits j * bits of word row r."""
    mask = (1 << bits) - 1
    codes = (packed[:, None, :] >> _shifts(bits, packed.device)[None, :, None]) & mask
    return codes.reshape(-1, packed.shape[1])


def unpack_columns(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) int32 words -> (R, C * 32 / bits) codes: column c * pf + j sits at bits j * bits of word c."""
    mask = (1 << bits) - 1
    codes = (packed[:, :, None] >> _shifts(bits, packed.device)[None, None, :]) & mask
    return codes.reshape(packed.shape[0], -1)


def unpack_awq_columns(packed: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM words (R, C) -> codes (R, 8 C) in output-column order (undoing [0, 2, 4, 6, 1, 3, 5, 7])."""
    slots = unpack_columns(packed, 4).reshape(packed.shape[0], -1, 8)
    undo = torch.tensor(_AWQ_UNDO, device=packed.device)
    return slots.index_select(2, undo).reshape(packed.shape[0], -1)


# -- the module ---------------------------------------------------------------------------------

class PackedQuantLinear(nn.Module):
    """A linear layer whose weight stays packed as the checkpoint stores it (buffers named as upstream
    names them, so `state_dict()` saves the same tensors back). `weight` is the packed `qweight`,
    there for code that asks a projection for its device; the forward never reads a float weight."""

    method = ""
    keep_checkpoint_dtype = True  # the loader keeps fp16 scales fp16 (a bf16 cast would round them)

    def __init__(self, in_features: int, out_features: int, spec: PackedSpec, *, bias: bool = False,
                 g_idx: bool = True, name: str = ""):
        super().__init__()
        if spec.method != self.method:
            raise ValueError(f"{type(self).__name__} holds {self.method} tensors, the spec is {spec.method}")
        spec.check_linear(in_features, out_features, name or type(self).__name__)
        self.in_features, self.out_features, self.spec, self.name = in_features, out_features, spec, name
        self.bits = spec.bits
        self.group_size = in_features if spec.group_size == -1 else spec.group_size
        self.groups = spec.group_count(in_features)
        shapes = spec.tensor_shapes(in_features, out_features)
        if not g_idx:
            shapes.pop("g_idx", None)
        for attr, shape in shapes.items():
            self.register_buffer(attr, torch.zeros(shape, dtype=torch.float16 if attr == "scales" else torch.int32))
        if "g_idx" not in shapes:
            self.g_idx = None
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self.kernel_preference = "auto"  # "auto" | "dequant" | "int4" (set_kernel)
        self.reset_kernel()

    # -- what the loader asks ------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        # where the layer computes (callers ask a projection for its device): the stored buffers
        # move to host memory once the CUDA int4 kernel holds its own copy (`_release_stored`)
        return self._anchor if self._anchor is not None else self.qweight

    def expected_shape(self, attr: str) -> tuple[int, ...]:
        if attr == "bias":
            return (self.out_features,)
        return tuple(self.spec.tensor_shapes(self.in_features, self.out_features)[attr])

    def shape_mismatch(self, attr: str, key: str, found: tuple[int, ...], where: str) -> str:
        """The loader's error for a stored tensor whose shape this layer does not expect."""
        spec, want = self.spec, self.expected_shape(attr)
        hint = ""
        if attr in ("qzeros", "scales") and len(found) == 2 and found[0] and found[0] != want[0] \
                and self.in_features % found[0] == 0:
            g = self.in_features // found[0]
            hint = f" ({found[0]} groups means group_size={-1 if found[0] == 1 else g})"
        elif attr == "qweight" and spec.method == "gptq" and len(found) == 2 and found[0] != want[0] \
                and (found[0] * 32) % self.in_features == 0:
            hint = f" ({found[0]} packed rows means bits={found[0] * 32 // self.in_features})"
        return (f"{spec.method.upper()} tensor {key!r} ({where}) has shape {tuple(found)}, but this "
                f"{self.in_features} -> {self.out_features} linear ({self.name}) with bits={spec.bits} and "
                f"group_size={spec.group_size} from {spec.source} expects {want}{hint}: the quantization config does "
                f"not describe these tensors; correct bits / group_size there to the values the checkpoint was made "
                f"with, or re-download the folder")

    def check_tensor(self, attr: str, key: str, t: torch.Tensor, where: str) -> None:
        """Refuse a stored tensor of the wrong kind (a float qweight is not a packed tensor)."""
        if attr in ("qweight", "qzeros", "g_idx") and t.dtype != torch.int32:
            raise PackedQuantError(f"{self.spec.method.upper()} tensor {key!r} ({where}) is {t.dtype}, but packed "
                                   f"{attr} tensors are int32: the file is not a {self.spec.method.upper()} export "
                                   f"or was converted; re-download it")
        if attr in ("scales", "bias") and not t.is_floating_point():
            raise PackedQuantError(f"{self.spec.method.upper()} tensor {key!r} ({where}) is {t.dtype}; {attr} must be "
                                   f"floating point: re-download the folder")

    def validate(self) -> None:
        """After loading: every g_idx names an existing group."""
        if self.g_idx is not None and self.g_idx.numel() and self.g_idx.device.type != "meta":
            lo, hi = int(self.g_idx.min()), int(self.g_idx.max())
            if lo < 0 or hi >= self.groups:
                raise PackedQuantError(f"{self.name}.g_idx holds groups {lo}..{hi}, but there are {self.groups} groups "
                                       f"(group_size={self.spec.group_size} over {self.in_features} inputs): the "
                                       f"checkpoint and {self.spec.source} disagree; correct group_size or re-download")

    # -- the integer weights -------------------------------------------------------------------
    def int_weight(self) -> torch.Tensor:
        """Codes (in, out) as int32."""
        raise NotImplementedError

    def int_zeros(self) -> torch.Tensor:
        """Zero points (groups, out) as int32, as the kernels subtract them."""
        raise NotImplementedError

    def group_index(self) -> torch.Tensor:
        """The group of every input row, (in,) long."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in): (q - z[g]) * s[g] computed in fp32, then cast to `dtype`."""
        g = self.group_index()
        z = self.int_zeros().index_select(0, g)
        s = self.scales.float().index_select(0, g)
        w = (self.int_weight() - z).float() * s
        return w.t().to(dtype)

    # -- kernels ---------------------------------------------------------------------------------
    def reset_kernel(self) -> None:
        self.kernel, self.kernel_note = "dequant", "no forward yet"
        self._prepared_key = None
        self._int4 = None
        self._anchor = None  # set while the stored buffers sit in host memory (CUDA int4 kernel)
        self._generation = getattr(self, "_generation", 0) + 1  # a new load invalidates prepared kernels

    def _key(self, device: torch.device) -> tuple:
        return (device, self._generation, self.kernel_preference)

    @torch.no_grad()
    def _release_stored(self, device: torch.device) -> None:
        """With the CUDA int4 kernel's copy built, keep the checkpoint's own tensors (what
        `state_dict()` saves and the dequantizing path reads) in host memory instead of on the GPU,
        so the layer holds one 4-bit copy there, not two."""
        for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            t = getattr(self, name, None)
            if t is not None and name != "bias" and t.device.type == "cuda":
                self._buffers[name] = t.to("cpu")
        self._anchor = torch.empty(0, device=device)

    def _int4_blocker(self, device: torch.device) -> str | None:
        """Why the int4 kernel cannot run this layer (None: it can)."""
        if self.bits != 4:
            return f"{self.bits}-bit weights (the int4 kernel takes 4-bit)"
        if self.group_size not in _TINYGEMM_GROUPS:
            return f"group size {self.group_size} (the int4 kernel takes {_TINYGEMM_GROUPS})"
        if self.in_features % 32 or self.out_features % 8:
            return f"shape {self.in_features} -> {self.out_features} (needs inputs % 32, outputs % 8)"
        if device.type == "cuda":
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
                return "this torch build has no aten._weight_int4pack_mm"
            major, _ = torch.cuda.get_device_capability(device)
            if major < 8:
                return "the int4 kernel needs compute capability 8.0 or newer"
        elif device.type == "cpu":
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                return "this torch build has no aten._weight_int4pack_mm_for_cpu"
        else:
            return f"device {device.type}"
        return None

    @torch.no_grad()
    def _prepare_int4(self, device: torch.device) -> None:
        """tinygemm's layout: codes (N, K) with groups as consecutive K runs (act-order rows sorted by
        group, the input permuted alike at run time) and (groups, N, 2) scale / float zero pairs;
        the kernel computes (q - 8) * scale + zero, so zero = (8 - z) * scale."""
        g = self.group_index()
        perm = None
        if not torch.equal(g, torch.arange(self.in_features, device=g.device) // self.group_size):
            if not torch.equal(torch.bincount(g, minlength=self.groups),
                               torch.full((self.groups,), self.group_size, device=g.device)):
                raise RuntimeError("act-order groups of unequal size")
            perm = torch.argsort(g, stable=True)
        q = self.int_weight()
        if perm is not None:
            q = q.index_select(0, perm)
        w = q.t().contiguous().to(device)  # (N, K)
        s = self.scales.float()
        sz = torch.stack([s, (8 - self.int_zeros()).float() * s], dim=-1).contiguous().to(device)
        inner = 8 if self.in_features % 128 == 0 else 4 if self.in_features % 64 == 0 else 2
        probe = torch.zeros(1, self.in_features, device=device)
        if device.type == "cuda":
            w8 = ((w[:, ::2] << 4) | w[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(w8.contiguous(), inner)
            sz = sz.to(torch.bfloat16)
            torch.ops.aten._weight_int4pack_mm(probe.bfloat16(), packed, self.group_size, sz)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.to(torch.int32), inner)
            torch.ops.aten._weight_int4pack_mm_for_cpu(probe, packed, self.group_size, sz)
        # (the probe call above makes a kernel that refuses these shapes fail here, not mid-generation)
        self._int4 = (packed, sz, None if perm is None else perm.to(device))

    def _choose(self, device: torch.device) -> None:
        pref = self.kernel_preference
        self._int4 = None
        kernel, note = "dequant", "dequantize to the activation dtype, then F.linear"
        if pref == "int4" or (pref == "auto" and device.type == "cuda"):
            why = self._int4_blocker(device)
            if why is None:
                try:
                    self._prepare_int4(device)
                    kernel = "int4"
                    note = ("tinygemm aten._weight_int4pack_mm (bf16 activations)" if device.type == "cuda"
                            else "aten._weight_int4pack_mm_for_cpu")
                except (RuntimeError, NotImplementedError) as e:  # an op missing or refusing: fall back
                    note = f"int4 kernel unavailable ({type(e).__name__}: {e}); dequantize"
            else:
                note = f"int4 kernel not used: {why}; dequantize"
        self.kernel, self.kernel_note = kernel, note
        if kernel == "int4" and device.type == "cuda":
            self._release_stored(device)
        elif self._anchor is not None and device.type == "cuda":  # back from the int4 kernel: buffers on the GPU
            for name in ("qweight", "qzeros", "scales", "g_idx"):
                if getattr(self, name, None) is not None:
                    self._buffers[name] = self._buffers[name].to(device)
            self._anchor = None
        self._prepared_key = self._key(device)

    def prepare(self, device: torch.device | None = None) -> str:
        """Choose (and build) the kernel for `device` now rather than on the first forward (before CUDA
        graph capture); returns the kernel name."""
        device = torch.device(device) if device is not None else self.weight.device
        if self._prepared_key != self._key(device):
            self._choose(device)
        return self.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prepared_key != self._key(x.device):
            self._choose(x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._int4 is None:
            return F.linear(x, self.dequantize(x.dtype), bias)
        packed, sz, perm = self._int4
        x2 = x.reshape(-1, self.in_features)
        if perm is not None:
            x2 = x2.index_select(1, perm)
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), packed, self.group_size, sz)
            y = y.to(x.dtype)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, self.group_size, sz.to(x.dtype))
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.reset_kernel()  # the buffers were copied in place: a prepared kernel is stale

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.spec.describe()}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class GPTQLinear(PackedQuantLinear):
    """auto_gptq / gptqmodel's layout: `qweight` (in*bits/32, out), `qzeros` (groups, out*bits/32),
    `scales` (groups, out), `g_idx` (in,), optional `bias`."""

    method = "gptq"

    def int_weight(self) -> torch.Tensor:
        return unpack_rows(self.qweight, self.bits)

    def int_zeros(self) -> torch.Tensor:
        z = unpack_columns(self.qzeros, self.bits)
        # v1 (auto_gptq) stores zero - 1 and its kernels add the one back to each extracted code
        return z + 1 if self.spec.checkpoint_format == "gptq" else z


class AWQLinear(PackedQuantLinear):
    """AWQ GEMM layout: `qweight` (in, out/8), `qzeros` (groups, out/8), `scales` (groups, out),
    eight output columns per int32 in the order [0, 2, 4, 6, 1, 3, 5, 7]; optional `bias`."""

    method = "awq"

    def __init__(self, in_features: int, out_features: int, spec: PackedSpec, *, bias: bool = False,
                 g_idx: bool = False, name: str = ""):
        super().__init__(in_features, out_features, spec, bias=bias, g_idx=False, name=name)

    def int_weight(self) -> torch.Tensor:
        return unpack_awq_columns(self.qweight)

    def int_zeros(self) -> torch.Tensor:
        return unpack_awq_columns(self.qzeros)


def linear_class(spec: PackedSpec) -> type[PackedQuantLinear]:
    return GPTQLinear if spec.method == "gptq" else AWQLinear


def packed_linears(model: nn.Module) -> list[PackedQuantLinear]:
    return [m for m in model.modules() if isinstance(m, PackedQuantLinear)]


def set_kernel(model: nn.Module, kernel: str = "auto") -> dict[str, int]:
    """Choose the path of every GPTQ / AWQ linear: "auto" (tinygemm int4 on CUDA, dequantize on the
    CPU), "int4" (the int4 kernel wherever it can run, the CPU included) or "dequant"; returns
    `kernel_summary` after preparing them on their devices."""
    if kernel not in ("auto", "int4", "dequant"):
        raise ValueError(f"kernel={kernel!r}: use 'auto', 'int4' or 'dequant'")
    for m in packed_linears(model):
        m.kernel_preference = kernel
        m.prepare()
    return kernel_summary(model)


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many GPTQ / AWQ linears run each kernel, e.g. {"int4": 224} or {"dequant": 7}."""
    return dict(Counter(m.kernel for m in packed_linears(model)))


__all__ = ["PackedSpec", "PackedQuantError", "PackedQuantLinear", "GPTQLinear", "AWQLinear",
           "read_packed_quantization", "packed_linears", "set_kernel", "kernel_summary",
           "unpack_rows", "unpack_columns", "unpack_awq_columns", "AWQ_ORDER", "QUANT_TENSORS"]
