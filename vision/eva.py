"""EVA ViT-g/14 vision tower (BLIP-2's image encoder) + `ln_vision`, as used by InternLM-XComposer v1.

The transformer itself is `timm.models.eva.Eva`: EVA (like BEiT) fuses q/k/v into one bias-free
Linear and keeps separate learned `q_bias` / `v_bias` vectors with a fixed zero k bias, which is
exactly timm's `EvaAttention(qkv_fused=True, qkv_bias=True)`. Configured with a class token,
absolute position embeddings, no RoPE, no SwiGLU, no layer scale, no pooling, no final norm and
no head, `Eva.forward_features` returns all 1 + (img/patch)^2 tokens after the last block, which
is what BLIP-2 feeds to `ln_vision` (an ordinary LayerNorm with PyTorch's default eps 1e-5).

Checkpoint names: timm's parameter names coincide with the EVA / LAVIS names used in the upstream
XComposer checkpoint (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.{i}.norm1`,
`attn.qkv`, `attn.q_bias`, `attn.v_bias`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`), so the key
map below is a table of identity rules; it exists so the loader can tell known keys from unknown
ones and so that a future rename on either side is a one-line change.

Meta-device construction: timm registers each attention's zero `k_bias` as a non-persistent
buffer, which `load_state_dict` never fills. `VisionTower` recreates those buffers itself after
`load_state_dict` (a post hook); a loader that fills tensors by other means must call
`VisionTower.init_non_persistent(device)` once the parameters are in place.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
from torch import nn

from timm.models.eva import Eva, EvaAttention

__all__ = [
    "EvaConfig",
    "VisionTower",
    "build_eva",
    "vision_key_map",
    "vision_to_checkpoint",
    "init_vision_weights",
]


@dataclass
class EvaConfig:
    """Shape of the EVA ViT; the defaults are BLIP-2's EVA-g/14 at 224 px with the last block removed
    (BLIP-2 builds 40 blocks and uses the features of the 39th, so the checkpoint has depth 39)."""

    img_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_ratio: float = 4.3637  # int(1408 * 4.3637) = 6144
    eps: float = 1e-6  # LayerNorms inside the ViT
    ln_vision_eps: float = 1e-5  # nn.LayerNorm default, as BLIP-2's ln_vision

    @classmethod
    def from_dict(cls, d: dict) -> "EvaConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens the tower outputs per image: the class token + one per patch."""
        return 1 + self.grid ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


def build_eva(cfg: EvaConfig) -> Eva:
    """A timm `Eva` with BLIP-2's EVA-g layout (see the module docstring). Built on the current default
    device (works under `with torch.device("meta")`)."""
    return Eva(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=3,
        num_classes=0,  # head = Identity
        global_pool="",
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        qkv_bias=True,  # q_bias / v_bias parameters, zero k_bias buffer
        qkv_fused=True,  # one bias-free qkv Linear, as EVA
        mlp_ratio=cfg.mlp_ratio,
        swiglu_mlp=False,
        scale_mlp=False,
        scale_attn_inner=False,
        norm_layer=partial(nn.LayerNorm, eps=cfg.eps),
        init_values=None,  # no layer scale
        class_token=True,
        use_abs_pos_emb=True,
        use_rot_pos_emb=False,
        use_post_norm=False,
        use_pre_transformer_norm=False,
        use_post_transformer_norm=False,  # norm = Identity: BLIP-2 takes the last block's output
        use_fc_norm=False,  # fc_norm = Identity
        head_init_scale=0.0,
    )


class VisionTower(nn.Module):
    """`visual_encoder` (timm Eva) followed by `ln_vision`: pixels (B, 3, H, W) -> (B, num_tokens, width)."""

    def __init__(self, config: EvaConfig | None = None):
        super().__init__()
        self.config = config or EvaConfig()
        self.visual_encoder = build_eva(self.config)
        self.ln_vision = nn.LayerNorm(self.config.width, eps=self.config.ln_vision_eps)
        # load_state_dict(assign=True) replaces parameters but leaves the meta k_bias buffers behind
        self.register_load_state_dict_post_hook(_recreate_buffers_after_load)

    @property
    def dtype(self) -> torch.dtype:
        return self.ln_vision.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.ln_vision.weight.device

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.visual_encoder.forward_features(pixel_values.to(self.dtype))
        return self.ln_vision(x)

    def init_non_persistent(self, device: torch.device | str | None = None) -> None:
        """(Re)create the non-persistent buffers (each attention's zero `k_bias`), on `device`, or
        else next to that attention's `q_bias`, in `q_bias`'s dtype. Needed after building on
        meta and filling parameters by any means other than `load_state_dict`; harmless otherwise."""
        for m in self.modules():
            if isinstance(m, EvaAttention) and m.q_bias is not None:
                dev = m.q_bias.device if device is None else torch.device(device)
                m.register_buffer("k_bias", torch.zeros(m.q_bias.shape, dtype=m.q_bias.dtype, device=dev),
                                  persistent=False)

    def has_meta_tensors(self) -> bool:
        return any(t.is_meta for t in list(self.parameters()) + list(self.buffers()))


def _recreate_buffers_after_load(module: VisionTower, incompatible_keys) -> None:
    for m in module.modules():
        if isinstance(m, EvaAttention) and m.q_bias is not None and m.k_bias is not None:
            if m.k_bias.is_meta and not m.q_bias.is_meta:
                module.init_non_persistent()
                return


# -----------------------------------------------------------------------------
# checkpoint key map: upstream (LAVIS / XComposer) name <-> VisionTower state_dict name
#
# {i} is a block index, {p} is weight|bias. Every row is an identity because timm's Eva uses the
# EVA names; the table is still the single place that says which keys belong to the tower.

_VISION_KEYS: list[tuple[str, str]] = [
    # upstream checkpoint                        ours
    ("visual_encoder.cls_token",                  "visual_encoder.cls_token"),
    ("visual_encoder.pos_embed",                  "visual_encoder.pos_embed"),
    ("visual_encoder.patch_embed.proj.{p}",       "visual_encoder.patch_embed.proj.{p}"),
    ("visual_encoder.blocks.{i}.norm1.{p}",       "visual_encoder.blocks.{i}.norm1.{p}"),
    ("visual_encoder.blocks.{i}.attn.qkv.weight", "visual_encoder.blocks.{i}.attn.qkv.weight"),
    ("visual_encoder.blocks.{i}.attn.q_bias",     "visual_encoder.blocks.{i}.attn.q_bias"),
    ("visual_encoder.blocks.{i}.attn.v_bias",     "visual_encoder.blocks.{i}.attn.v_bias"),
    ("visual_encoder.blocks.{i}.attn.proj.{p}",   "visual_encoder.blocks.{i}.attn.proj.{p}"),
    ("visual_encoder.blocks.{i}.norm2.{p}",       "visual_encoder.blocks.{i}.norm2.{p}"),
    ("visual_encoder.blocks.{i}.mlp.fc1.{p}",     "visual_encoder.blocks.{i}.mlp.fc1.{p}"),
    ("visual_encoder.blocks.{i}.mlp.fc2.{p}",     "visual_encoder.blocks.{i}.mlp.fc2.{p}"),
    ("ln_vision.{p}",                             "ln_vision.{p}"),
]
_VISION_DROP: list[str] = []  # upstream keys to discard (none: the tower has no unused tensors)


def _compile(template: str) -> re.Pattern:
    pat = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pat)


def _fill(template: str, m: re.Match) -> str:
    d = m.groupdict()
    return template.format(**{k: v for k, v in d.items() if v is not None})


class KeyTable:
    """Two-way map between checkpoint names and module names given as `{i}`/`{p}` templates."""

    def __init__(self, pairs: list[tuple[str, str]], drop: list[str] = ()):
        self.pairs = list(pairs)
        self._fwd = [(_compile(a), b) for a, b in self.pairs]
        self._inv = [(_compile(b), a) for a, b in self.pairs]
        self._drop = [_compile(d) for d in drop]

    def to_ours(self, ckpt_key: str) -> str | None:
        """Module name for an upstream key; None to drop it; an unknown key comes back unchanged."""
        if any(d.fullmatch(ckpt_key) for d in self._drop):
            return None
        for pat, tmpl in self._fwd:
            m = pat.fullmatch(ckpt_key)
            if m:
                return _fill(tmpl, m)
        return ckpt_key

    def to_checkpoint(self, our_key: str) -> str:
        for pat, tmpl in self._inv:
            m = pat.fullmatch(our_key)
            if m:
                return _fill(tmpl, m)
        raise KeyError(f"no checkpoint name for {our_key!r}")


VISION_KEYS = KeyTable(_VISION_KEYS, _VISION_DROP)


def vision_key_map(ckpt_key: str) -> str | None:
    """Upstream checkpoint key (`visual_encoder.*`, `ln_vision.*`) -> VisionTower state_dict key.
    None means drop; unknown keys are returned unchanged so a strict loader reports them."""
    return VISION_KEYS.to_ours(ckpt_key)


def vision_to_checkpoint(our_key: str) -> str:
    """VisionTower state_dict key -> upstream checkpoint key (KeyError for a key the table lacks)."""
    return VISION_KEYS.to_checkpoint(our_key)


# -----------------------------------------------------------------------------
# deterministic random weights for tests and benchmarks

@torch.no_grad()
def init_random_(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Fill every parameter from `generator`: N(0, std) for all tensors except LayerNorm weights,
    which get 1 + N(0, std). Biases are random too (so a swapped bias shows in parity tests).
    Draws on the generator's device in fp32 in state_dict order, then copies into place; the
    result depends only on the generator's seed and device."""
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            r = torch.randn(p.shape, generator=generator, device=generator.device, dtype=torch.float32) * std
            if isinstance(mod, nn.LayerNorm) and name == "weight":
                r += 1.0
            p.copy_(r)


def init_vision_weights(tower: VisionTower, generator: torch.Generator, std: float = 0.02) -> VisionTower:
    """Deterministic random weights (see `init_random_`); the tower must not be on meta (call
    `to_empty` first). Also resets the zero k_bias buffers. Returns the tower."""
    init_random_(tower, generator, std)
    tower.init_non_persistent()
    return tower
