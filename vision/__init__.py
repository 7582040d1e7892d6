"""Image loading, validation, preprocessing and the EVA ViT-g vision tower (see issue: vision/model)."""
