"""Perceive sampler: Q-Former queries, image flags and projection into the LLM space (see issue: vision/model)."""
