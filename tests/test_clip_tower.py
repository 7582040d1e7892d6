"""XComposer2's CLIP tower and vision_proj against transformers' CLIPVisionModel and the definition."""
import math

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from projector import VisionProjector
from vision.clip import CLIP_VIT_L14, ClipTower, clip_vision_config, interpolate_positions

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_tower_equals_clip_vision_model_at_native_size():
    torch.manual_seed(0)
    ref = CLIPVisionModel(CLIPVisionConfig(image_size=42, **TINY)).eval()
    _randomize(ref)
    ours = ClipTower(42, TINY).eval()
    ours.load_clip(ref.state_dict())
    px = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        want = ref(pixel_values=px).last_hidden_state[:, 1:]  # before post_layernorm, CLS dropped
        got = ours(px)
    assert got.shape == (2, 9, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_interpolation_equals_reference_and_builds_from_smaller_clip():
    torch.manual_seed(1)
    small = CLIPVisionModel(CLIPVisionConfig(image_size=42, **TINY)).eval()  # 3x3 grid
    _randomize(small)
    table = small.state_dict()["embeddings.position_embedding.weight"]
    # reference written here: class row kept, grid resized bicubic without corner alignment
    grid = table[1:].reshape(3, 3, 32).permute(2, 0, 1)[None]
    ref = F.interpolate(grid, size=(5, 5), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(25, 32)
    want = torch.cat([table[:1], ref])
    torch.testing.assert_close(interpolate_positions(table, 5), want, rtol=0, atol=0)
    tower = ClipTower(70, TINY)  # 5x5 grid, built from the 3x3 CLIP
    tower.load_clip(small.state_dict())
    stored = tower.state_dict()["vision_tower.vision_model.embeddings.position_embedding.weight"]
    torch.testing.assert_close(stored, want, rtol=0, atol=0)
    assert tower(torch.randn(1, 3, 70, 70)).shape == (1, 25, 32)


def test_upstream_keys_round_trip_and_stored_table_taken_as_is():
    tower = ClipTower(70, TINY)
    sd = tower.state_dict()
    assert all(k.startswith("vision_tower.vision_model.") for k in sd)
    assert sd["vision_tower.vision_model.embeddings.position_embedding.weight"].shape == (26, 32)
    other = ClipTower(70, TINY)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_default_is_vit_l14_and_490px_has_1226_positions():
    cfg = clip_vision_config(490)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.patch_size, cfg.hidden_act) == (1024, 24, 16, 4096, 14, "quick_gelu")
    with torch.device("meta"):
        tower = ClipTower(490)
    assert tower.num_patches == 1225
    assert tower.vision_tower.embeddings.position_embedding.weight.shape == (1226, 1024)
    assert CLIP_VIT_L14["image_size"] == 336


def test_bad_image_size_is_named():
    import pytest
    with pytest.raises(ValueError, match="multiple of the patch size"):
        clip_vision_config(500)
    with pytest.raises(ValueError, match=r"\(B, 3, 42, 42\)"):
        ClipTower(42, TINY)(torch.randn(1, 3, 28, 28))


def test_projector_equals_its_definition():
    torch.manual_seed(2)
    proj = VisionProjector(32, 48)
    assert sorted(proj.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    x = torch.randn(2, 5, 32)
    sd = proj.state_dict()
    h = x @ sd["0.weight"].t() + sd["0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    want = h @ sd["2.weight"].t() + sd["2.bias"]
    torch.testing.assert_close(proj(x), want, rtol=1e-6, atol=1e-6)
