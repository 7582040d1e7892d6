"""CLIP ViT-L/14 vision tower of InternLM-XComposer2, on transformers' `CLIPVisionModel`.

XComposer2 (`build_mlp.py` of the hub repos) wraps `CLIPVisionModel.from_pretrained(
"openai/clip-vit-large-patch14-336")`, resizes its 24x24 position table to 35x35 at init (490 px
images, hard-coded), and takes the last encoder layer's hidden states (`hidden_states[-1]`, i.e.
before `post_layernorm`) without the class token. The transformer here is transformers' own
`CLIPVisionModel`; this module only

* sizes it: the known ViT-L/14 shape (`CLIP_VIT_L14`), or a `vision_config` dict in config.json
  (transformers' `CLIPVisionConfig` field names; tiny test checkpoints use it), with
  `image_size` = the checkpoint's `img_size`, so the position table has (img/patch)^2 + 1 rows as
  stored (1226 at 490 px);
* maps keys: upstream `vit.vision_tower.vision_model.*` <-> `CLIPVisionModel`'s `vision_model.*`;
* interpolates a position table only when it is built from a CLIP of another size
  (`interpolate_positions`, upstream's bicubic `resize_pos`).
Facts and sources: docs/checkpoint-format.md ("XComposer2").
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIP_VIT_L14", "ClipTower", "clip_vision_config", "interpolate_positions", "CHECKPOINT_PREFIX"]

# openai/clip-vit-large-patch14-336's vision part (its config.json), in CLIPVisionConfig's names
CLIP_VIT_L14: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "num_channels": 3,
}
CHECKPOINT_PREFIX = "vit.vision_tower."  # upstream: self.vit = CLIPVisionTower; .vision_tower = CLIPVisionModel


def clip_vision_config(img_size: int, vision_config: dict | None = None):
    """A `CLIPVisionConfig` for `img_size` px images: ViT-L/14 unless `vision_config` says otherwise."""
    from transformers import CLIPVisionConfig

    fields = dict(CLIP_VIT_L14 if vision_config is None else vision_config)
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size <= 0:
        raise ValueError(f"img_size={img_size!r} must be a positive integer (config.json's `img_size`)")
    patch = int(fields.get("patch_size", 14))
    if img_size % patch:
        raise ValueError(f"img_size={img_size} is not a multiple of the patch size {patch}")
    fields["image_size"] = img_size
    fields.pop("model_type", None)
    return CLIPVisionConfig(**fields)


def interpolate_positions(table: torch.Tensor, new_grid: int) -> torch.Tensor:
    """(1 + g*g, C) position table -> (1 + new_grid^2, C): the class row kept, the g x g grid
    resized bicubically (align_corners=False) in fp32, as upstream's `resize_pos` does."""
    n, c = table.shape
    g = math.isqrt(n - 1)
    if g * g != n - 1:
        raise ValueError(f"position table of {n} rows is not 1 + a square grid")
    if g == new_grid:
        return table.clone()
    grid = table[1:].reshape(1, g, g, c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, c).to(table.dtype)
    return torch.cat([table[:1], grid], dim=0)


class ClipTower(nn.Module):
    """`CLIPVisionModel` returning (B, (img/patch)^2, width) patch features of the last layer."""

    def __init__(self, img_size: int, vision_config: dict | None = None):
        super().__init__()
        from transformers import CLIPVisionModel

        self.config = clip_vision_config(img_size, vision_config)
        self.img_size = img_size
        self.vision_tower = CLIPVisionModel(self.config)
        self.vision_tower.requires_grad_(False)
        # transformers < 5 nests the modules under `vision_model.`; 5.x has them at the top
        self.inner = "vision_model." if hasattr(self.vision_tower, "vision_model") else ""

    @property
    def width(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.config.patch_size) ** 2

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() != 4 or pixels.shape[1:] != (3, self.img_size, self.img_size):
            raise ValueError(f"pixels must be (B, 3, {self.img_size}, {self.img_size}), got {tuple(pixels.shape)}")
        out = self.vision_tower(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-1][:, 1:]

    def load_clip(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a `CLIPVisionModel` state dict of any image size (e.g. the 336 px CLIP): its position
        table is interpolated to this tower's grid."""
        sd = {self.inner + k.removeprefix("vision_model."): v for k, v in state_dict.items()}
        key = self.inner + "embeddings.position_embedding.weight"
        grid = self.img_size // self.config.patch_size
        if key in sd and sd[key].shape[0] != grid * grid + 1:
            sd[key] = interpolate_positions(sd[key], grid)
        sd.pop(self.inner + "embeddings.position_ids", None)
        return self.vision_tower.load_state_dict(sd, strict=strict)


    def key_map(self, key: str) -> str | None:
        """An upstream key below `vit.` (`vision_tower.vision_model.X`) -> ours below this module;
        None for the position ids buffer older transformers saved (derived, not a weight)."""
        if key.endswith("embeddings.position_ids"):
            return None
        if key.startswith("vision_tower.vision_model."):
            return "vision_tower." + self.inner + key[len("vision_tower.vision_model."):]
        return key

    def upstream_key(self, name: str) -> str:
        """Ours below this module -> upstream's below `vit.`."""
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + name[len("vision_tower."):]
        return name

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Upstream's keys (`vision_tower.vision_model.*`) whatever transformers' version nests."""
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for k in [k for k in sd if k.startswith(prefix)]:
            v = sd.pop(k)
            if not k.endswith("embeddings.position_ids"):
                sd[prefix + self.upstream_key(k[len(prefix):])] = v
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        sd = {}
        for k, v in state_dict.items():
            name = self.key_map(k)
            if name is not None:
                sd[name] = v
        return super().load_state_dict(sd, strict=strict, assign=assign)
