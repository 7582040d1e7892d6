"""XComposer2's `vision_proj`: Linear(vision width, hidden), GELU, Linear(hidden, hidden).

Upstream (`build_mlp.py`, `build_vision_projector`: projector type "mlp2x_gelu", widths 1024 and
4096 fixed in `modeling_internlm_xcomposer2.py`) builds it as an `nn.Sequential`, so its checkpoint
keys are `vision_proj.0.{weight,bias}` and `vision_proj.2.{weight,bias}`; a Sequential of the same
three modules here keeps those names. Facts and sources: docs/checkpoint-format.md ("XComposer2").
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["VisionProjector"]


class VisionProjector(nn.Sequential):
    """(B, N, in_features) image features -> (B, N, out_features) image tokens."""

    def __init__(self, in_features: int = 1024, out_features: int = 4096):
        super().__init__(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"vision_proj expects {self.in_features} features per token, got {x.shape[-1]}")
        return super().forward(x)
