"""A tiny, randomly initialised open_clip model written to disk, so image libraries can be built and
searched offline: in tests, examples and demos. Its retrieval is noise (the weights are random), but
every step of the real pipeline runs: config registration, weight loading, preprocessing, encoding.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP_NAME = "tiny-clip"

# Smallest shapes open_clip's standard CLIP builds with: 32x32 images in 4x4 patches of 8 pixels.
# The vocabulary and context length are CLIP's own, so open_clip's bundled BPE tokenizer applies.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_tiny_clip(folder: str | Path, *, seed: int = 0) -> tuple[str, Path, Path]:
    """Write `tiny-clip.json` (an open_clip model config) and `tiny-clip.safetensors` (random
    weights from `seed`) into `folder`; return (model_name, config_path, weights_path).

    The same seed always gives the same weights, and the caller's random state is left untouched."""
    from open_clip.model import CLIP  # built directly: no need to register the config globally
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{TINY_CLIP_NAME}.json"
    weights_path = folder / f"{TINY_CLIP_NAME}.safetensors"

    with torch.random.fork_rng(devices=[]):  # seed locally, restore the global generator afterwards
        torch.manual_seed(seed)
        model = CLIP(**json.loads(json.dumps(TINY_CLIP_CONFIG)))  # a copy: CLIP may edit nested dicts
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    config_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n", encoding="utf-8")
    save_file(state, str(weights_path))
    return TINY_CLIP_NAME, config_path, weights_path
