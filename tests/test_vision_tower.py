"""EVA ViT-g vision tower: shapes, parity with an independently built timm Eva and with the LAVIS
math written out by hand, the upstream key map, and meta-device construction."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vision import EvaConfig, VisionTower, init_vision_weights, vision_key_map, vision_to_checkpoint

TINY = dict(img_size=28, patch_size=14, width=64, depth=2, heads=4, mlp_ratio=4.3637)


def tiny_tower(seed: int = 0, std: float = 0.1) -> VisionTower:
    t = VisionTower(EvaConfig(**TINY)).eval()
    return init_vision_weights(t, torch.Generator().manual_seed(seed), std=std)


def lavis_keys(depth: int) -> list[str]:
    """The tower's upstream checkpoint names, written from the LAVIS / XComposer key list."""
    keys = ["visual_encoder.cls_token", "visual_encoder.pos_embed",
            "visual_encoder.patch_embed.proj.weight", "visual_encoder.patch_embed.proj.bias"]
    for i in range(depth):
        b = f"visual_encoder.blocks.{i}"
        keys += [f"{b}.norm1.weight", f"{b}.norm1.bias", f"{b}.attn.qkv.weight", f"{b}.attn.q_bias",
                 f"{b}.attn.v_bias", f"{b}.attn.proj.weight", f"{b}.attn.proj.bias", f"{b}.norm2.weight",
                 f"{b}.norm2.bias", f"{b}.mlp.fc1.weight", f"{b}.mlp.fc1.bias", f"{b}.mlp.fc2.weight",
                 f"{b}.mlp.fc2.bias"]
    return keys + ["ln_vision.weight", "ln_vision.bias"]


def upstream_state_dict(tower: VisionTower) -> dict[str, torch.Tensor]:
    return {vision_to_checkpoint(k): v.clone() for k, v in tower.state_dict().items()}


def pixels(b: int, size: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------

def test_config_roundtrip_and_tokens():
    c = EvaConfig()
    assert c.num_tokens == 257 and c.mlp_hidden == 6144 and c.heads == 16 and c.width // c.heads == 88
    assert EvaConfig.from_dict({**c.to_dict(), "unknown": 1}) == c
    assert EvaConfig(**TINY).num_tokens == 5


def test_output_shape_and_dtype():
    t = tiny_tower()
    with torch.no_grad():
        y = t(pixels(3))
    assert y.shape == (3, 5, 64) and y.dtype == t.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_no_final_norm_or_head():
    ve = VisionTower(EvaConfig(**TINY)).visual_encoder
    for name in ("norm", "fc_norm", "head", "norm_pre"):
        assert isinstance(getattr(ve, name), nn.Identity), name
    assert ve.attn_pool is None and ve.rope is None
    assert all(b.gamma_1 is None and b.gamma_2 is None for b in ve.blocks)  # no layer scale
    assert all(type(b.mlp.act) is nn.GELU and b.mlp.act.approximate == "none" for b in ve.blocks)


def test_full_size_shapes_on_meta():
    with torch.device("meta"):
        t = VisionTower()
    sd = t.state_dict()
    assert len(t.visual_encoder.blocks) == 39
    assert sorted(vision_to_checkpoint(k) for k in sd) == sorted(lavis_keys(39))
    shapes = {"visual_encoder.cls_token": (1, 1, 1408), "visual_encoder.pos_embed": (1, 257, 1408),
              "visual_encoder.patch_embed.proj.weight": (1408, 3, 14, 14),
              "visual_encoder.blocks.38.attn.qkv.weight": (4224, 1408),
              "visual_encoder.blocks.38.attn.q_bias": (1408,), "visual_encoder.blocks.38.attn.v_bias": (1408,),
              "visual_encoder.blocks.38.mlp.fc1.weight": (6144, 1408),
              "visual_encoder.blocks.38.mlp.fc2.weight": (1408, 6144), "ln_vision.weight": (1408,)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert t.visual_encoder.blocks[0].norm1.eps == 1e-6 and t.ln_vision.eps == 1e-5
    assert t.visual_encoder.blocks[0].attn.scale == 88 ** -0.5


def test_parity_with_independent_timm_eva():
    """timm's own EVA-g recipe (eva_giant_patch14_224) shrunk to the tiny size + a plain LayerNorm."""
    import timm

    ours = tiny_tower()
    ref = timm.create_model("eva_giant_patch14_224", pretrained=False, img_size=28, embed_dim=64, depth=2,
                            num_heads=4, mlp_ratio=4.3637, num_classes=0, global_pool="",
                            use_post_transformer_norm=False).eval()
    ln = nn.LayerNorm(64)  # eps 1e-5
    sd = ours.state_dict()
    ref.load_state_dict({k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")},
                        strict=True)
    ln.load_state_dict({"weight": sd["ln_vision.weight"], "bias": sd["ln_vision.bias"]})
    for b in (1, 3):
        x = pixels(b)
        with torch.no_grad():
            assert (ours(x) - ln(ref.forward_features(x))).abs().max() < 1e-5


def lavis_math(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """BLIP-2's EVA forward written out from the facts, reading the upstream-layout dict directly."""
    ve = lambda k: sd["visual_encoder." + k]  # noqa: E731
    x = F.conv2d(x, ve("patch_embed.proj.weight"), ve("patch_embed.proj.bias"), stride=14)
    x = x.flatten(2).transpose(1, 2)
    B, _, C = x.shape
    x = torch.cat([ve("cls_token").expand(B, -1, -1), x], dim=1) + ve("pos_embed")
    N, D = x.shape[1], C // heads
    for i in range(depth):
        p = lambda k: ve(f"blocks.{i}.{k}")  # noqa: E731
        h = F.layer_norm(x, (C,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
        qkv = F.linear(h, p("attn.qkv.weight"), bias).reshape(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * D ** -0.5, qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(B, N, C), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (C,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + F.linear(h, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    return F.layer_norm(x, (C,), sd["ln_vision.weight"], sd["ln_vision.bias"], eps=1e-5)


def test_parity_with_lavis_math_on_upstream_layout():
    ours = tiny_tower(seed=3, std=0.2)
    sd = upstream_state_dict(ours)
    assert sorted(sd) == sorted(lavis_keys(2))
    for b in (1, 2):
        x = pixels(b, seed=b)
        with torch.no_grad():
            assert (ours(x) - lavis_math(sd, x, depth=2, heads=4)).abs().max() < 1e-5


def test_key_map_roundtrip():
    ours = tiny_tower()
    our_keys = set(ours.state_dict())
    upstream = lavis_keys(2)
    mapped = [vision_key_map(k) for k in upstream]
    assert None not in mapped and len(set(mapped)) == len(mapped)
    assert set(mapped) == our_keys  # no missing, no unexpected
    assert {vision_to_checkpoint(k) for k in our_keys} == set(upstream)
    for k in upstream:
        assert vision_to_checkpoint(vision_key_map(k)) == k
    # strict load through the map
    sd = {vision_key_map(k): v for k, v in upstream_state_dict(ours).items()}
    fresh = VisionTower(EvaConfig(**TINY))
    fresh.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("key", ["visual_encoder.norm.weight", "visual_encoder.head.weight",
                                 "visual_encoder.blocks.0.attn.qkv.bias", "visual_encoder.fc_norm.bias",
                                 "Qformer.bert.embeddings.LayerNorm.weight", "ln_vision.running_mean"])
def test_unknown_keys_come_back_unchanged(key):
    assert vision_key_map(key) == key
    with pytest.raises(KeyError):
        vision_to_checkpoint(key)


def test_timm_checkpoint_filter_fn_agrees():
    """timm's own converter for original EVA checkpoints leaves the LAVIS names as they are (after
    the `visual_encoder.` prefix, which it does not know, is removed), i.e. they are timm's names."""
    from timm.models.eva import checkpoint_filter_fn

    ours = tiny_tower()
    up = upstream_state_dict(ours)
    vis = {k[len("visual_encoder."):]: v for k, v in up.items() if k.startswith("visual_encoder.")}
    out = checkpoint_filter_fn(dict(vis), ours.visual_encoder)
    assert set(out) == set(vis)
    for k, v in vis.items():
        assert torch.equal(out[k], v), k
        assert vision_key_map("visual_encoder." + k) == "visual_encoder." + k


def test_meta_construction_and_assign_load():
    ref = tiny_tower()
    sd = upstream_state_dict(ref)
    with torch.device("meta"):
        t = VisionTower(EvaConfig(**TINY))
    assert t.has_meta_tensors()
    res = t.load_state_dict({vision_key_map(k): v for k, v in sd.items()}, strict=True, assign=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert not t.has_meta_tensors()  # k_bias recreated by the load hook
    for blk in t.visual_encoder.blocks:
        assert blk.attn.k_bias.device.type == "cpu" and not blk.attn.k_bias.any()
    x = pixels(2)
    with torch.no_grad():
        assert torch.equal(t.eval()(x), ref(x))


def test_meta_then_manual_fill_needs_init_non_persistent():
    ref = tiny_tower()
    with torch.device("meta"):
        t = VisionTower(EvaConfig(**TINY)).eval()
    t.to_empty(device="cpu")
    with torch.no_grad():  # fill parameters by hand, as a streaming loader might
        for name, p in t.named_parameters():
            p.copy_(ref.get_parameter(name))
    t.init_non_persistent("cpu")
    x = pixels(1)
    with torch.no_grad():
        assert torch.equal(t(x), ref(x))


def test_assign_load_in_bfloat16():
    ref = tiny_tower()
    sd = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    with torch.device("meta"):
        t = VisionTower(EvaConfig(**TINY)).eval()
    t.load_state_dict(sd, assign=True)
    assert t.dtype == torch.bfloat16
    assert all(b.attn.k_bias.dtype == torch.bfloat16 for b in t.visual_encoder.blocks)
    with torch.no_grad():
        y = t(pixels(1))  # float pixels are cast to the tower's dtype
        assert y.dtype == torch.bfloat16
        assert (y.float() - ref(pixels(1))).abs().max() < 0.1


def test_init_is_deterministic():
    a, b, c = tiny_tower(seed=5), tiny_tower(seed=5), tiny_tower(seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual_encoder.pos_embed"], sc["visual_encoder.pos_embed"])
