"""Perceive sampler: Q-Former queries, image flags and projection into the LLM space (see issue: vision/model)."""

from .sampler import (
    PerceiveSampler,
    SamplerConfig,
    init_sampler_weights,
    sampler_key_map,
    sampler_to_checkpoint,
    to_blip2_qformer,
)
from .mlp import VisionProjector  # XComposer2 vision_proj
