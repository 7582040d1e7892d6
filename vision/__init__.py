"""Image loading, validation, preprocessing and the EVA ViT-g vision tower (see issue: vision/model)."""

from .clip import CLIP_VIT_L14, ClipTower, clip_vision_config, interpolate_positions  # XComposer2
from .eva import (  # EVA ViT-g/14 tower + ln_vision
    EvaConfig,
    VisionTower,
    build_eva,
    init_vision_weights,
    vision_key_map,
    vision_to_checkpoint,
)
from .image import (  # trusted image input: load, validate, convert to RGB, preprocess
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    IMAGE_SIZE,
    ImageError,
    load_image,
    load_images,
    preprocess,
    to_data_uri,
)
