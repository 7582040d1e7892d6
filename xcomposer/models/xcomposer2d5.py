"""`XComposer2d5`: InternLM-XComposer-2.5 (internlm-xcomposer2d5-7b).

    from xcomposer.models.xcomposer2d5 import XComposer2d5
    model = XComposer2d5.from_pretrained("internlm/internlm-xcomposer2d5-7b", device="cuda", dtype=torch.bfloat16)
    reply, history = model.chat("Describe this image in detail.", image=["dubai.png"])
    reply, history = model.chat("And the colour of the sky?", history=history)  # images kept in history
    reply, _ = model.chat("Image1 <ImageHere>; Image2 <ImageHere>; Which car is faster?", image=["a.jpg", "b.jpg"])
    reply, _ = model.chat("Describe this video.", image=["clip.mp4"])  # frames tiled into one image
    html = model.write_webpage("A website for a research lab, blue navigation bar ...")
    article = model.write_artical("Please write a blog based on the title: French Pastries")
    reply, history = model.chat(tokenizer, query, image=[...], hd_num=24, history=[])  # upstream's signature

What differs from XComposer2 (`models/xcomposer2.py`, whose loader, tokenizer and Partial LoRA it
reuses), all from upstream's remote code (docs/checkpoint-format.md, "XComposer2.5"):

* Vision: CLIP ViT-L/14 at 560 px on 560-px crops of a high-resolution tiling (`vision.hd`): one
  bicubic 560 x 560 global view plus rows x cols sub-crops; each crop's 40 x 40 patch features are
  merged 2 x 2 into 400 tokens of 4 x 1024 features; a learnt `plora_sub_GN` token ends every row
  (of the global view and of the sub-crop mosaic) and `plora_glb_GN` separates the two; then
  `vision_proj` (4096 -> 4096 -> 4096). Tokens per image: (rows*cols + 1) * 400 + 1 + (rows + 1) * 20.
* `hd_num` (default 24) bounds the crops; a prompt with several images encodes each with 6.
* A video is sampled at one frame per second (at most 32 frames), the frames tiled into one
  labelled composite image, encoded like an image without the tiling step.
* Task LoRAs on every projection (`lora_web`, `lora_sft`, `lora_dpo`), scale 1, on every token of a
  request: `infer_mode="web"` adds `lora_web`, `"write"` adds `lora_sft` and `lora_dpo`, `"base"`
  none. They stay beside the base weights, so requests of different modes share one model.
* Prompt: chatml as XComposer2, no system turn unless `use_meta=True`; only the first text part gets
  `<s>`; a lone image with no `<ImageHere>` anywhere goes before the whole prompt.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from projector.mlp import VisionProjector
from vision.image import ImageError, load_image

from ..llm.checkpoint import CheckpointError
from ..llm.generation import GenerationConfig, PromptTooLongError, generate, stream_generate
from ..llm.tokenizer import check_text
from .vl_prompt import (IMAGE_PLACEHOLDER, multi_image_label, normalize_history, place_images,
                        text_until_stop)
from ..llm.chat_format import Message
from .xcomposer2 import (ARCHITECTURE, GEN_DEFAULTS, IM_END, IM_START, XCOMPOSER2_META_INSTRUCTION, XComposer2,
                         XComposer2ChatFormat,
                         XComposer2Config, _check_query, _tensor_shape, checkpoint_generation, is_xcomposer2_config)

CROP = 560  # upstream build_mlp.CLIPVisionTower: 560-px crops, 40 x 40 patches, merged 2 x 2
DEFAULT_HD_NUM = 24  # chat()'s hd_num
MULTI_IMAGE_HD_NUM = 6  # interleav_wrap_chat: several images -> hd_num = 6
CHAT_MAX_LENGTH = 16384  # interleav_wrap_chat's max_length: the longest prompt chat() builds
ARTICLE_MAX_LENGTH = 8192  # write_artical's max_length: prompt plus article
MAX_HD_NUM = 100
INFER_MODES = {"base": (), "web": ("web",), "write": ("sft", "dpo")}
TASK_LORAS = ("web", "sft", "dpo")

# write_artical's meta instruction (used only with use_meta=True)
ARTICLE_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文.\n"
)
# write_artical's generate() settings (top_p and top_k fixed there; max_new_tokens = max_length - prompt)
ARTICLE_DEFAULTS = dict(do_sample=True, num_beams=1, temperature=1.0, top_p=0.8, top_k=40, repetition_penalty=1.005)
# write_webpage / resume_2_webpage / screen_2_webpage's generate() settings
WEB_DEFAULTS = dict(do_sample=True, num_beams=2, temperature=1.0, repetition_penalty=3.0, max_new_tokens=4800,
                    top_p=1.0)
RESUME_PROMPT = " Generate a personal page using the content in the resume:"
RESUME_JS_PROMPT = " Generate JavaScript events for the html code:"
SCREENSHOT_PROMPT = " Generate the HTML code of this web image with Tailwind CSS."
WEB_TASKS = {"instruction": "Instruction-aware Webpage Generation", "resume": "Resume-to-Personal Page",
             "screenshot": "Screenshot-to-Webpage"}
_UNSPLASH = re.compile(r"""https://source\.unsplash\.com/random/(\d+)x(\d+)/\?([^'"]+)""")
# a path is a video by its name (upstream's video_extensions, and WebM; a .gif is an image, as upstream
# reads it); a data URI by its type (data:video/...)
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".wmv", ".webm")


def _hd():
    import vision.hd as hd  # PyAV is imported there on first video only
    return hd


@dataclass
class XComposer2d5Config(XComposer2Config):
    img_size: int = CROP
    max_length: int = CHAT_MAX_LENGTH
    task_lora_ranks: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_image(self) -> int:  # one crop plus the global view, the smallest image
        return hd_tokens(1, 1, self.patch_grid)

    @property
    def patch_grid(self) -> int:
        return self.img_size // int((self.vision_config or {}).get("patch_size", 14))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "XComposer2d5Config":
        base = XComposer2Config.from_dict(d)
        ranks = d.get("task_lora_ranks") or {}
        if not isinstance(ranks, dict):
            raise CheckpointError("config.json's task_lora_ranks must be an object of name -> rank")
        cfg = cls(llm=base.llm, img_size=CROP, max_length=int(d.get("max_length", CHAT_MAX_LENGTH)),
                  vision_config=base.vision_config, plora_rank=base.plora_rank, raw=dict(d),
                  task_lora_ranks={str(k): int(v) for k, v in ranks.items()})
        grid = cfg.patch_grid
        if grid % 2 or grid * int((cfg.vision_config or {}).get("patch_size", 14)) != CROP:
            raise CheckpointError(f"the vision tower's patch grid at {CROP} px is {grid}: it must divide {CROP} "
                                  f"exactly and be even (2 x 2 patch merging)")
        return cfg

    @classmethod
    def from_folder(cls, folder: Path, cfg_file: Path) -> "XComposer2d5Config":
        """config.json plus what upstream fixes in code and the weights tell: the task LoRA ranks
        (`lora_web_A` etc. shapes) and the Partial LoRA rank."""
        try:
            d = json.loads(Path(cfg_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg_file} cannot be read as JSON ({e}); re-download config.json") from e
        if not is_xcomposer2_config(d):
            raise CheckpointError(f"config.json names architectures {d.get('architectures')!r}, not "
                                  f"[{ARCHITECTURE!r}]: this is not an InternLM-XComposer2.5 checkpoint")
        d = dict(d)
        if "task_lora_ranks" not in d:
            ranks = {}
            for name in TASK_LORAS:
                shape = _tensor_shape(folder, f"model.layers.0.attention.wo.lora_{name}_A.weight")
                if shape is not None:
                    ranks[name] = int(shape[0])
            d["task_lora_ranks"] = ranks
        if "plora_rank" not in d:
            shape = _tensor_shape(folder, "model.layers.0.attention.wo.Plora_A.weight")
            if shape is not None:
                d["plora_rank"] = int(shape[0])
        return cls.from_dict(d)

    def meta_model(self) -> tuple[nn.Module, str, list[str]]:
        with torch.device("meta"):
            return XComposer2d5(self), "llm.", ["vit", "vision_proj", "plora_glb_GN", "plora_sub_GN"]


def xcomposer2d5_7b_config() -> XComposer2d5Config:
    """internlm-xcomposer2d5-7b's shapes for planning without weights: InternLM2-7B, CLIP ViT-L/14 at
    560 px, Partial LoRA 256, task LoRAs web 512 / sft 512 / dpo 256 (LMDeploy's merge tool and the
    hub weights; docs/checkpoint-format.md)."""
    from ..llm.config import internlm2_5_7b_chat_config

    d = {**internlm2_5_7b_chat_config(torch_dtype="bfloat16").to_dict(), "architectures": [ARCHITECTURE],
         "max_length": CHAT_MAX_LENGTH, "task_lora_ranks": {"web": 512, "sft": 512, "dpo": 256}}
    return XComposer2d5Config.from_dict(d)


def hd_tokens(cols: int, rows: int, grid: int = 40) -> int:
    """Tokens of one image tiled into rows x cols crops (upstream's `(h*w+1)*400 + 1 + (h+1)*20`,
    h = rows, for a 40 x 40 patch grid merged 2 x 2)."""
    half = grid // 2
    return (rows * cols + 1) * half * half + 1 + (rows + 1) * half


def check_hd_num(hd_num) -> int:
    if isinstance(hd_num, bool) or not isinstance(hd_num, int) or not 1 <= hd_num <= MAX_HD_NUM:
        raise ValueError(f"hd_num={hd_num!r}: must be an integer from 1 to {MAX_HD_NUM} (the most 560-px crops an "
                         f"image is cut into; upstream's default is {DEFAULT_HD_NUM})")
    return hd_num


def check_infer_mode(mode) -> str:
    if mode not in INFER_MODES:
        raise ValueError(f"infer_mode={mode!r} is unknown: use 'base' (chat), 'web' (web pages) or 'write' (articles)")
    return mode


def is_video_ref(item) -> bool:
    if isinstance(item, (str, os.PathLike)):
        s = os.fsdecode(os.fspath(item))
        if s.startswith("data:"):
            return s[5:].lower().startswith("video/")
        return s.lower().endswith(VIDEO_EXTENSIONS)
    return False


def _data_uri_bytes(uri: str) -> bytes:
    head, _, payload = uri.partition(",")
    if ";base64" not in head:
        raise ValueError(f"a data URI must be base64 encoded ({head[:40]!r}...)")
    return base64.b64decode(payload, validate=False)


class Video:
    """A video given as bytes (or a path) where its file name cannot tell it is one."""

    def __init__(self, source, mime: str = "video/mp4"):
        self.source, self.mime = source, mime

    def reference(self) -> str:
        if isinstance(self.source, (str, os.PathLike)):
            return str(Path(self.source).expanduser().absolute())
        data = bytes(self.source)
        return f"data:{self.mime};base64," + base64.b64encode(data).decode("ascii")


# -- where the images go ------------------------------------------------------------------------

def chat_prompt(texts: Sequence[str], replies: Sequence[str], meta_instruction: str = "") -> str:
    """interleav_wrap_chat's prompt text: optional system turn, past turns, the new user turn."""
    prompt = f"{IM_START}system\n{meta_instruction}{IM_END}\n" if meta_instruction else ""
    for q, r in zip(texts[:-1], replies):
        prompt += f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{r}{IM_END}\n"
    return prompt + f"{IM_START}user\n{texts[-1]}{IM_END}\n{IM_START}assistant\n"


def composition_tile(img):
    """The 2.5 composition demo's `R560_HD18_Identity_transform`: as the chat tiling (portrait images
    transposed, the largest `scale` with scale * ceil(scale / ratio) <= 18), then scale =
    min(ceil(width * 1.5 / 560), scale) (its random draw is between two equal bounds), width
    scale * 560, and the height padded with white to a multiple of 560 *centred* (half above, the rest
    below), not at the bottom as the chat tiling does."""
    from PIL import Image
    from torchvision.transforms import functional as TF
    width, height = img.size
    trans = width < height
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        width, height = img.size
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= 18:
        scale += 1
    scale = min(math.ceil(width * 1.5 / CROP), scale - 1)
    new_w = int(scale * CROP)
    new_h = max(int(new_w / ratio), 1)
    img = TF.resize(img, [new_h, new_w])
    target = math.ceil(new_h / CROP) * CROP
    top = (target - new_h) // 2
    img = TF.pad(img, [0, top, 0, target - new_h - top], fill=[255, 255, 255])
    return img.transpose(Image.Transpose.TRANSPOSE) if trans else img


def fix_image_urls(html: str) -> str:
    """Upstream's web functions point retired `source.unsplash.com/random/WxH/?q` images at
    `picsum.photos/W/H` (its `image_type = 'random'`)."""
    return _UNSPLASH.sub(r"https://picsum.photos/\1/\2", html)


def _clean(text: str) -> str:
    return text.replace(IM_END, "").replace(IM_START, "")


class XComposer2d5(XComposer2):
    """XComposer2 plus `plora_glb_GN` / `plora_sub_GN`, a 4096-wide `vision_proj` and the task LoRAs."""

    composition_style = "xcomposer2d5"
    # upstream's 2.5 composition demo runs every step with infer_mode='write'
    composition_task_loras = INFER_MODES["write"]

    def __init__(self, config: XComposer2d5Config):
        super().__init__(config)
        width = self.vit.width
        self.vision_proj = VisionProjector(4 * width, config.llm.hidden_size)
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, 4 * width))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, 4 * width))
        self.llm.add_task_loras(config.task_lora_ranks)
        self.llm.context_window = max(config.max_length, config.llm.max_position_embeddings,
                                      CHAT_MAX_LENGTH + GEN_DEFAULTS["max_new_tokens"])
        self.meta_instruction = XCOMPOSER2_META_INSTRUCTION
        self.hd_num = DEFAULT_HD_NUM
        self._image_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.font = None  # vision.hd's default: Pillow's bundled font (upstream downloads SimHei)

    def key_map(self, key: str):
        if key in ("plora_glb_GN", "plora_sub_GN"):
            return key
        return super().key_map(key)

    @classmethod
    def from_pretrained(cls, path_or_hub_id, **kwargs) -> "XComposer2d5":
        return super().from_pretrained(path_or_hub_id, **kwargs)

    @classmethod
    def _read_config(cls, folder: Path, cfg_file: Path) -> XComposer2d5Config:
        return XComposer2d5Config.from_folder(folder, cfg_file)

    def _loaded_note(self) -> str:
        return (f"XComposer2.5: {CROP}-px crops, hd_num {self.hd_num} by default, task LoRAs "
                f"{sorted(self.config.task_lora_ranks) or 'none'}")

    # -- images ------------------------------------------------------------------------------
    def tile(self, item, hd_num: int):
        """The tiled picture of one image (upstream's Image_transform) or video (load_video ->
        frame2img -> Video_transform)."""
        hd = _hd()
        if isinstance(item, Video):
            return hd.video_to_image(item.source, font=self.font)
        if is_video_ref(item):
            s = os.fsdecode(os.fspath(item))
            src = _data_uri_bytes(s) if s.startswith("data:") else s
            return hd.video_to_image(src, font=self.font)
        return hd.hd_transform(load_image(item), hd_num)

    def encode_tiled(self, pixels: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
        """(1, 3, rows*560, cols*560) normalized pixels -> (tokens, hidden) image tokens; `grad`: with
        autograd (fine-tuning the tower or the projector), else in inference mode."""
        with torch.inference_mode(not grad):
            return self._encode_tiled(pixels)

    def _encode_tiled(self, pixels: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[0] != 1 or pixels.shape[1] != 3 \
                or pixels.shape[2] % CROP or pixels.shape[3] % CROP or pixels.shape[2] == 0 or pixels.shape[3] == 0:
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"encode_tiled expects (1, 3, H, W) pixels with H and W multiples of {CROP}, got {got}; "
                             f"vision.hd.hd_transform tiles an image")
        if not bool(torch.isfinite(pixels).all()):
            raise ValueError("the pixel tensor holds NaN or infinite values; preprocess the image again")
        rows, cols = pixels.shape[2] // CROP, pixels.shape[3] // CROP
        vdtype = self.vision_proj[0].weight.dtype
        img = pixels.to(self.device)
        crops = img.reshape(1, 3, rows, CROP, cols, CROP).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, CROP, CROP)
        glb = F.interpolate(img.float(), size=(CROP, CROP), mode="bicubic")
        feats = self.vit(torch.cat([glb.to(vdtype), crops.to(vdtype)]))  # (1 + n, g*g, C)
        n, hw, c = feats.shape
        g, half = math.isqrt(hw), math.isqrt(hw) // 2
        merged = feats.reshape(n, half, 2, half, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, half, half, 4 * c)
        sub_gn = self.plora_sub_GN.to(vdtype)
        glb_tokens = torch.cat([merged[:1], sub_gn.expand(1, half, 1, 4 * c)], dim=2).reshape(1, -1, 4 * c)
        mosaic = merged[1:].reshape(rows, cols, half, half, 4 * c).permute(0, 2, 1, 3, 4)
        mosaic = mosaic.reshape(1, rows * half, cols * half, 4 * c)
        sub_tokens = torch.cat([mosaic, sub_gn.expand(1, rows * half, 1, 4 * c)], dim=2).reshape(1, -1, 4 * c)
        tokens = torch.cat([glb_tokens, self.plora_glb_GN.to(vdtype), sub_tokens], dim=1)[0]
        assert tokens.shape[0] == hd_tokens(cols, rows, g)
        return self.vision_proj(tokens).to(self.dtype)

    def _image_tokens(self, image) -> list[torch.Tensor]:
        """Image tokens of the composition prompts (`complete` / `raw_prompt`): each picture tiled as
        upstream's 2.5 composition demo does (`composition_tile`), then encoded like a chat image."""
        if image is None:
            return []
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        return self._visual_tokens(items, "compose", lambda item, _: composition_tile(load_image(item)))

    def training_image_tokens(self, path) -> torch.Tensor:
        """One training image's tokens as upstream's finetune makes them (R560_HD18 tiling,
        `composition_tile`), with autograd and no cache: for fine-tuning the tower or the projector."""
        return self.encode_tiled(self._pixels(composition_tile(load_image(path))), grad=True)

    def _pixels(self, picture) -> torch.Tensor:
        return _hd().hd_pixels(picture, None)  # already tiled: CLIP's normalization only

    def _visual_tokens(self, items: Sequence, hd_num, tiler=None) -> list[torch.Tensor]:
        """(tokens, hidden) per item (`tiler(item, hd_num)` -> its tiled picture; `tile` by default),
        cached by reference and tiling."""
        tiler = tiler or self.tile
        out = []
        for k, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                out.append(self.encode_tiled(item))
                continue
            key = self._cache_key25(item, hd_num)
            if key is not None and key in self._image_cache:
                self._image_cache.move_to_end(key)
                out.append(self._image_cache[key])
                continue
            try:
                picture = tiler(item, hd_num)
            except ImageError as e:
                if len(items) > 1:
                    raise ImageError(e.reason, source=e.source, index=k, total=len(items)) from e
                raise
            emb = self.encode_tiled(self._pixels(picture))
            if key is not None and self.image_cache_size > 0:
                self._image_cache[key] = emb
                while len(self._image_cache) > self.image_cache_size:
                    self._image_cache.popitem(last=False)
            out.append(emb)
        return out

    @staticmethod
    def _cache_key25(item, hd_num: int) -> tuple | None:
        if isinstance(item, (str, os.PathLike)):
            s = os.fsdecode(os.fspath(item))
            if s.startswith("data:"):
                return (hashlib.sha256(s.encode()).hexdigest(), hd_num)
            key = XComposer2._cache_key(s)
            return None if key is None else (key, hd_num)
        return None

    def reference(self, item) -> str:
        """As XComposer2's, and a `Video` as its path or its bytes in a data URI."""
        if isinstance(item, Video):
            return item.reference()
        return super().reference(item)

    # -- prompts -----------------------------------------------------------------------------
    @property
    def chat_format(self) -> "XComposer2d5ChatFormat":
        """This model's chat format: what the server, the web demo and `pipeline` build prompts with."""
        return XComposer2d5ChatFormat(self)

    def gen_config(self, options: dict[str, Any], defaults: dict[str, Any] | None = None) -> GenerationConfig:
        tok = self._require_tokenizer()
        stops = [tok.eos_token_id, tok.token_to_id(IM_END)]
        base = GenerationConfig(eos_token_id=stops, pad_token_id=tok.pad_token_id)
        return base.replace(**{**(GEN_DEFAULTS if defaults is None else defaults), **options})

    def _embed_prompt(self, prompt: str, images: Sequence, hd_num: int, max_length: int):
        """interleav_wrap_chat: split at `<ImageHere>`, the first part with `<s>` (even when empty),
        the others without; image k after part k. -> (embeddings, image mask, text ids)."""
        tok = self._require_tokenizer()
        parts = prompt.split(IMAGE_PLACEHOLDER)
        if len(parts) - 1 != len(images):
            raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} but {len(images)} image(s)")
        visual = self._visual_tokens(images, hd_num)
        emb = self.llm.model.embed_tokens
        embeds, mask, ids = [], [], []
        for k, part in enumerate(parts):
            if k == 0 or part:
                p = tok.encode(part, add_bos=(k == 0))
                if p:
                    embeds.append(emb(torch.tensor(p, dtype=torch.long, device=self.device)))
                    mask.append(torch.zeros(len(p), dtype=torch.bool))
                    ids += p
            if k < len(visual):
                embeds.append(visual[k].to(self.device, self.dtype))
                mask.append(torch.ones(visual[k].shape[0], dtype=torch.bool))
        x, m = torch.cat(embeds), torch.cat(mask)
        if x.shape[0] > max_length:
            sizes = ", ".join(str(v.shape[0]) for v in visual)
            raise PromptTooLongError(
                f"the prompt is {x.shape[0]} tokens (images: {sizes or 'none'}) but at most {max_length} fit: lower "
                f"hd_num (each {CROP}-px crop is {(self.config.patch_grid // 2) ** 2} tokens), send fewer "
                f"images or frames, or shorten the history")
        return x, m, ids

    def _plan25(self, query, image, history, meta_instruction, use_meta, hd_num):
        """The prompt text (placeholders in), where the images go, the history read, the hd_num used."""
        query = _check_query(query)
        past = normalize_history(history)
        given = [] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
        hd_num = check_hd_num(self.hd_num if hd_num is None else hd_num)
        meta = ""
        if use_meta:
            meta = self.meta_instruction if meta_instruction is None else check_text(meta_instruction,
                                                                                      "meta_instruction")
        placed = place_images(past, query, given, label=multi_image_label, ref=self.reference)
        prompt = chat_prompt(placed.texts, [t[1] for t in past], meta)
        if placed.front:
            prompt = IMAGE_PLACEHOLDER + prompt
        if len(placed.images) > 1:
            hd_num = MULTI_IMAGE_HD_NUM
        return prompt, placed, past, hd_num

    def _build25(self, query, image, history, meta_instruction, use_meta, hd_num, max_length=CHAT_MAX_LENGTH):
        prompt, placed, past, hd_num = self._plan25(query, image, history, meta_instruction, use_meta, hd_num)
        with torch.inference_mode():
            x, m, ids = self._embed_prompt(prompt, placed.images, hd_num, max_length)
        return x, m, ids, past, placed

    def prompt_length(self, query: str, image=None, history=None, meta_instruction: str | None = None, *,
                      use_meta: bool = False, hd_num: int | None = None) -> tuple[int, list[int]] | None:
        """(tokens of the prompt `chat` would build, tokens of each image) from the text and the
        pictures' sizes, without encoding anything; None when a video is among the images (its
        composite's size is known only once its frames are decoded). For budgets before prefill."""
        prompt, placed, _, hd_num = self._plan25(query, image, history, meta_instruction, use_meta, hd_num)
        hd, tok = _hd(), self._require_tokenizer()
        per_image = []
        for item in placed.images:
            if isinstance(item, Video) or is_video_ref(item):
                return None
            if isinstance(item, torch.Tensor):
                cols, rows = hd.grid_of(item)
            else:
                cols, rows = hd.hd_grid(*load_image(item).size, hd_num)
            per_image.append(hd_tokens(cols, rows, self.config.patch_grid))
        parts = prompt.split(IMAGE_PLACEHOLDER)
        text = sum(len(tok.encode(part, add_bos=(k == 0))) for k, part in enumerate(parts) if k == 0 or part)
        return text + sum(per_image), per_image

    def build_inputs(self, query: str, image=None, history=None, meta_instruction: str | None = None,
                     use_meta: bool = False, hd_num: int | None = None):
        """(embeddings (L, hidden), image mask (L,), text ids) of one chat turn, as `chat` builds it."""
        return self._build25(query, image, history, meta_instruction, use_meta, hd_num)[:3]

    def prepare_chat(self, query: str, image=None, history=None, meta_instruction: str | None = None, *,
                     use_meta: bool = False, hd_num: int | None = None):
        x, m, ids, past, placed = self._build25(query, image, history, meta_instruction, use_meta, hd_num)
        return (x, m, ids), lambda reply: self._history_after(past, placed, reply)

    # -- the chat API --------------------------------------------------------------------------
    @staticmethod
    def _upstream_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Upstream's `chat(tokenizer, query, image=[], hd_num=24, history=[], streamer=None, ...)`: the
        tokenizer is dropped (ours is `model.tokenizer`); positional arguments follow its order."""
        args, kwargs = XComposer2._upstream_args(args, kwargs)
        if kwargs.pop("streamer", None) is not None:
            raise ValueError("streamer= is not supported: use model.stream_chat(...) for text as it is generated")
        names = ("text", "image", "hd_num", "history")
        if len(args) > len(names):
            raise TypeError(f"chat takes at most {len(names)} positional arguments after the tokenizer "
                            f"(query, image, hd_num, history); pass the rest by name")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"chat got {name} both by position and by name")
            kwargs[name] = value
        return (), kwargs

    def _turn(self, text, image, history, meta_instruction, options: dict[str, Any], stream: bool):
        """XComposer2's turn with 2.5's words: `hd_num`, `infer_mode` (the task LoRAs every step of
        the generation applies), `use_meta`; stream_chat uses chat()'s defaults (2.5 has no stream_chat)."""
        options = dict(options)
        hd_num, use_meta = options.pop("hd_num", None), bool(options.pop("use_meta", False))
        loras = INFER_MODES[check_infer_mode(options.pop("infer_mode", "base"))]
        self._check_loras(loras)
        cfg = self.gen_config(options)
        x, m, ids, past, placed = self._build25(text, image, history, meta_instruction, use_meta, hd_num)
        return x, m, ids, past, placed, cfg, {"task_loras": loras}

    def _check_loras(self, loras: Sequence[str]) -> None:
        missing = [n for n in loras if n not in self.config.task_lora_ranks]
        if missing:
            raise ValueError(f"this checkpoint has no lora_{missing[0]} weights, which that infer_mode needs "
                             f"(it has {sorted(self.config.task_lora_ranks) or 'none'}); use infer_mode='base'")

    # -- articles and web pages ----------------------------------------------------------------
    def _task_inputs(self, inst: str, image, meta: str = "", max_length: int = CHAT_MAX_LENGTH):
        """(embeddings, image mask) of a one-turn task prompt (interleav_wrap_chat with no history; its
        `hd_num` default, 24)."""
        x, m, _, _, _ = self._build25(inst, image, None, meta, bool(meta), DEFAULT_HD_NUM, max_length)
        return x, m

    def _decode_task(self, tokens: list[int]) -> str:
        tok = self._require_tokenizer()
        cut = next((i for i, t in enumerate(tokens) if t == tok.eos_token_id), len(tokens))
        return _clean(tok.decode(tokens[:cut], skip_special_tokens=True))

    def _task_config(self, defaults: dict[str, Any], options: dict[str, Any], seed=None) -> GenerationConfig:
        """A web / article step's settings: upstream's for that function, then the caller's; stops at eos
        and `[UNUSED_TOKEN_145]` (upstream: write_artical's stop word 92542; the web functions stop at
        eos only, which the reply's end marker precedes, so it would run on to the token limit)."""
        tok = self._require_tokenizer()
        opts = {**defaults, **options}
        if seed is not None and seed != -1:
            opts["seed"] = int(seed)
        return GenerationConfig(eos_token_id=[tok.eos_token_id, tok.token_to_id(IM_END)],
                                pad_token_id=tok.pad_token_id).replace(**opts)

    def _article_inputs(self, inst, image, history, max_length, use_meta, seed, options):
        self._check_loras(INFER_MODES["write"])
        if history:
            raise ValueError("write_artical writes from one instruction; history is not used there (upstream "
                             "ignores it): use chat(..., infer_mode='write') for several turns")
        x, m = self._task_inputs(inst, image, meta=ARTICLE_META_INSTRUCTION if use_meta else "", max_length=max_length)
        defaults = {**ARTICLE_DEFAULTS, "max_new_tokens": max(max_length - x.shape[0], 1)}
        return x, m, self._task_config(defaults, options, seed)

    def write_artical(self, inst: str, image=None, hd_num: int = 25, history=None, *, max_length: int = ARTICLE_MAX_LENGTH,
                      seed: int = -1, use_meta: bool = False, **options: Any) -> str:
        """Upstream's `write_artical`: an article (markdown) from an instruction and optional images,
        with the write LoRAs (`lora_sft` + `lora_dpo`). Its defaults: sampling, top_p 0.8, top_k 40,
        repetition penalty 1.005, up to `max_length` (8192) tokens of prompt plus article; `seed`
        (-1: none) makes it repeatable. `hd_num` is accepted and, as upstream, not used (24)."""
        x, m, cfg = self._article_inputs(inst, image, history, max_length, use_meta, seed, options)
        with torch.inference_mode():
            out = generate(self.llm, inputs_embeds=[x], image_mask=[m], config=cfg, task_loras=INFER_MODES["write"])
        return self._decode_task(out.tokens[0])

    write_article = write_artical

    def stream_artical(self, inst: str, image=None, *, max_length: int = ARTICLE_MAX_LENGTH, seed: int = -1,
                       use_meta: bool = False, **options: Any) -> Iterator[str]:
        """`write_artical` as text pieces while they are generated."""
        x, m, cfg = self._article_inputs(inst, image, None, max_length, use_meta, seed, options)
        chunks = stream_generate(self.llm, inputs_embeds=x, image_mask=m, config=cfg, task_loras=INFER_MODES["write"])
        for piece in text_until_stop(self._require_tokenizer(), chunks, set(cfg.stop_ids)):
            yield _clean(piece)

    def _web_html(self, inst: str, image, seed, options) -> str:
        self._check_loras(INFER_MODES["web"])
        cfg = self._task_config(WEB_DEFAULTS, options, seed)
        x, m = self._task_inputs(inst, image)
        with torch.inference_mode():
            out = generate(self.llm, inputs_embeds=[x], image_mask=[m], config=cfg, task_loras=INFER_MODES["web"])
        return self._decode_task(out.tokens[0])

    def write_webpage(self, inst: str, image=None, *, seed: int = -1, task: str = WEB_TASKS["instruction"],
                      **options: Any) -> str:
        """Upstream's `write_webpage`: an HTML page from an instruction (and optional images) with the
        web LoRA; defaults: sampling, 2 beams, repetition penalty 3.0, up to 4800 new tokens. Returns
        the HTML (image URLs pointed at picsum.photos as upstream does); nothing is written to disk
        (`save_html` does, atomically)."""
        return fix_image_urls(self._web_html(inst, image, seed, options))

    def resume_2_webpage(self, inst: str, image=None, *, seed: int = -1, task: str = WEB_TASKS["resume"],
                         **options: Any) -> str:
        """Upstream's `resume_2_webpage`: `inst` is a markdown resume (its text, or a path to a .md
        file); a personal page, then its JavaScript events in a second pass, put into the page."""
        resume = inst
        if isinstance(inst, (str, os.PathLike)) and len(str(inst)) < 4096 and str(inst).lower().endswith(
                (".md", ".markdown", ".txt")):
            try:
                resume = Path(inst).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"the resume {inst} cannot be read as UTF-8 markdown ({e}): pass its text "
                                 f"or a readable .md file") from e
        html = self._web_html(RESUME_PROMPT + check_text(resume, "the resume"), image, seed, options)
        js = self._web_html(RESUME_JS_PROMPT + html, image, seed, options)
        return fix_image_urls(merge_script(html, js))

    def screen_2_webpage(self, inst: str = "", image=None, *, seed: int = -1, task: str = WEB_TASKS["screenshot"],
                         **options: Any) -> str:
        """Upstream's `screen_2_webpage`: the HTML (Tailwind CSS) of a screenshot; `inst` is ignored
        as upstream ignores it (its instruction is fixed)."""
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("screen_2_webpage needs a screenshot: pass image=[path]")
        return fix_image_urls(self._web_html(SCREENSHOT_PROMPT, images, seed, options))


class XComposer2d5ChatFormat(XComposer2ChatFormat):
    """XComposer2.5: XComposer2's format with upstream 2.5's image rules (a lone image before the
    prompt, several labelled `Image1 <ImageHere>; ...`, `<ImageHere>` written in the text places
    them: an image part's place among the text parts is not used), each turn's images kept with it,
    high-resolution tiling (`hd_num`), video, and the task LoRAs of `infer_mode`, both per request.
    A system message becomes the system turn (`use_meta`). An image's tokens come from its size and
    `hd_num`; a video's only once its frames are decoded, so a prompt with one is not fitted."""

    family = "xcomposer2d5"
    takes_video = True
    request_options = ("hd_num", "infer_mode")

    def generation_config(self, options=None, *, completion: bool = False) -> GenerationConfig:
        return self.model.gen_config(dict(options or {}))

    def _message_text(self, m: Message) -> str:
        return m.text

    def _meta(self, system: str | None) -> dict[str, Any]:
        return {} if system is None else {"use_meta": True, "meta_instruction": system}

    def _request(self, request: dict[str, Any]) -> tuple[str, ...]:
        loras = INFER_MODES[check_infer_mode(request.get("infer_mode") or "base")]
        self.model._check_loras(loras)
        if request.get("hd_num") is not None:
            check_hd_num(request["hd_num"])
        return loras

    def _count(self, query, images, past, meta, request) -> tuple[int | None, list[int]]:
        counted = self.model.prompt_length(query, images or None, past, hd_num=request.get("hd_num"), **meta)
        return (None, []) if counted is None else counted

    def _prepare(self, query, images, past, meta, request):
        return self.model.prepare_chat(query, images or None, past, hd_num=request.get("hd_num"), **meta)

    def _finish(self, query, images, past, meta, request):
        _, placed, read, _ = self.model._plan25(query, images or None, past, meta.get("meta_instruction"),
                                                meta.get("use_meta", False), request.get("hd_num"))
        return lambda reply: self.model._history_after(read, placed, reply)

    def _too_long_hint(self) -> str:
        return f"; or lower hd_num (each {CROP}-px crop is {(self.model.config.patch_grid // 2) ** 2} tokens)"


def merge_script(html: str, js_reply: str) -> str:
    """resume_2_webpage's merge: with a `</script>` in the page, the `<script>` bodies of the second
    reply go before it; else the whole reply goes before `</html>`. (Upstream formats the list of
    bodies with its Python repr; we join them with newlines.)"""
    if "</script>" in html:
        bodies = "\n".join(re.findall(r"<script>([\s\S]*?)</script>", js_reply))
        return re.sub(r"(</script>)", lambda m: f"\n{bodies}\n" + m.group(1), html)
    if "</html>" in html:
        return re.sub(r"(</html>)", lambda m: f"\n{js_reply}\n" + m.group(1), html)
    return html


def save_html(html: str, path: str | os.PathLike) -> Path:
    """Write a generated page atomically (a temporary file in the same folder, then renamed)."""
    import tempfile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path



__all__ = ["XComposer2d5", "XComposer2d5ChatFormat", "XComposer2d5Config", "Video", "hd_tokens", "check_hd_num", "check_infer_mode",
           "INFER_MODES", "DEFAULT_HD_NUM", "MULTI_IMAGE_HD_NUM", "checkpoint_generation", "place_images",
           "multi_image_label", "chat_prompt", "normalize_history", "merge_script", "save_html", "fix_image_urls",
           "xcomposer2d5_7b_config", "ARTICLE_META_INSTRUCTION", "WEB_DEFAULTS", "ARTICLE_DEFAULTS", "is_video_ref",
           "VIDEO_EXTENSIONS", "WEB_TASKS"]
