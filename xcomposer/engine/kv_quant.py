"""Quantized K/V for the paged pool (LMDeploy's `quant_policy` 8 and 4).

Each key (and value) vector of one token in one kv head is stored as `bits`-bit codes with its own
scale and zero point, asymmetric over the head's `head_dim` elements:

    scale = (max - min) / (2**bits - 1),  zero = min
    code  = clamp(floor((x - zero) / scale + 0.5), 0, 2**bits - 1)
    x'    = code * scale + zero

This is TurboMind's form (src/turbomind/kernels/attention/quantization.h, `warp_stats` and
`quantize`: the zero point is the minimum in value units, codes are computed from the stored
scale and zero). LMDeploy's PyTorch engine (lmdeploy/pytorch/kernels/cuda/fill_kv_cache.py)
stores the zero point in code units instead (-min / scale, dequantized as code * scale - scale *
zero): the same values in exact arithmetic. int4 packs element i of the first half of the head in a
byte's low nibble and element i + head_dim / 2 in its high nibble, as both of LMDeploy's engines do.

Scales and zero points live in `sharding.kv_scale_dtype(model dtype)`; a zeroed slot (scale 0,
zero 0, codes 0) dequantizes to 0, so freshly handed-out blocks stay all zeros. Every function here
has fixed output shapes and no host sync (CUDA graphs capture them).
"""
from __future__ import annotations

import torch


def quantize(x: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., d) -> codes (..., d) uint8 for 8 bits, (..., d / 2) for 4 bits (two per byte), and
    (..., 2) [scale, zero] in `scale_dtype`, one pair per vector over its last dimension."""
    levels = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    sz = torch.cat([(hi - lo) / levels, lo], -1).to(scale_dtype)  # what is stored ...
    scale, zero = sz[..., :1].float(), sz[..., 1:].float()  # ... is what the codes are computed from
    # scale 0 (a constant vector, or a range below scale_dtype's smallest number): every code 0 gives zero
    inv = torch.where(scale > torch.finfo(torch.float32).tiny, 1.0 / scale, torch.zeros_like(scale))
    q = ((xf - zero) * inv + 0.5).floor().clamp_(0, levels).to(torch.uint8)
    if bits == 4:
        h = q.shape[-1] // 2
        q = q[..., :h] | (q[..., h:] << 4)
    return q, sz


def dequantize(codes: torch.Tensor, sz: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Codes and [scale, zero] pairs from `quantize` -> values (..., d) in `dtype`. The arithmetic
    runs in `dtype`, or in float32 for bfloat16 (whose 8-bit mantissa would round the scale)."""
    if bits == 4:
        codes = torch.cat([codes & 15, codes >> 4], -1)
    ct = torch.float32 if dtype == torch.bfloat16 else dtype
    sz = sz.to(ct)
    return torch.addcmul(sz[..., 1:], codes.to(ct), sz[..., :1]).to(dtype)


__all__ = ["quantize", "dequantize"]
