"""`XComposer2`: CLIP ViT-L/14 + vision_proj + InternLM2 with Partial LoRA (internlm-xcomposer2-vl-7b, -7b).

    from xcomposer.models.xcomposer2 import XComposer2
    model = XComposer2.from_pretrained("internlm/internlm-xcomposer2-vl-7b", device="cuda", dtype=torch.float16)
    text = model.generate("<ImageHere>Please describe this image in detail.", image="cat.jpg")
    reply, history = model.chat("<ImageHere>Who is this?", image="a.jpg")
    reply, history = model.chat("And then?", history=history)  # the returned history keeps the image
    reply, history = model.chat("And then?", image="a.jpg", history=pairs)  # upstream's way: pairs + every image
    reply, history = model.chat(tokenizer, query="...", image="a.jpg", history=[])  # upstream's signature

The checkpoint is read with upstream's key names (`model.*` InternLM2 with `Plora_A` / `Plora_B`,
`output`, `vit.vision_tower.vision_model.*`, `vision_proj.*`), strictly, shard by shard. Image
tokens (1225 per image at 490 px) go through the decoder's Partial LoRA: the prompt carries a
per-token image mask. Prompt layout (upstream's `interleav_wrap_chat`): chatml with
`[UNUSED_TOKEN_146]` / `[UNUSED_TOKEN_145]`, upstream's meta instruction as the system turn,
the text split at each `<ImageHere>` and every part tokenized on its own with `<s>`. Facts,
sources and our documented choices: docs/checkpoint-format.md ("XComposer2").
"""
from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from projector.mlp import VisionProjector
from vision.clip import ClipTower
from vision.image import ImageError, load_image, preprocess, to_data_uri, unnormalize

from ..llm.checkpoint import CheckpointError, SplitKey, _read_index, _shard_keys, checkpoint_folder, load_checkpoint_into
from ..llm.chat import fit_turns
from ..llm.chat_format import ChatFormat, ChatFormatError, ChatPrompt, Message
from ..llm.config import InternLM2Config
from ..llm.decoder import InternLMForCausalLM
from ..llm.generation import GenerationConfig, PromptTooLongError, generate, stream_generate
from ..llm.internlm import check_device, resolve_dtype
from ..llm.quant import (checkpoint_quantization, planned_quantization, prepare_packed_kernels, quantize_model_,
                         quantized_target, resolve_quantization)
from ..llm.internlm2 import checkpoint_key_map as internlm2_key_map, upstream_name as internlm2_upstream_name
from ..llm.tokenizer import InternLMTokenizer, check_text, load_tokenizer
from .vl_prompt import IMAGE_PLACEHOLDER, ChatStream, normalize_history, place_images, text_until_stop

ARCHITECTURE = "InternLMXComposer2ForCausalLM"
IM_START, IM_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
# fixed in upstream's code, not in config.json (modeling_internlm2.py PLoRA(..., lora_r=256, lora_alpha=256);
# build_mlp.py: CLIP width 1024 -> hidden 4096)
PLORA_RANK = 256
VISION_WIDTH = 1024

# upstream InternLMXComposer2ForCausalLM.chat() defaults
GEN_DEFAULTS = dict(do_sample=True, temperature=1.0, top_p=0.8, repetition_penalty=1.005, max_new_tokens=1024)
# upstream stream_chat() passes temperature=0.8 (the rest as chat())
STREAM_DEFAULTS = dict(temperature=0.8)

# upstream InternLMXComposer2ForCausalLM.chat()'s default `meta_instruction`
XCOMPOSER2_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based "
    "on the provided image."
)


# upstream's composition demo stops on id 92397 (`stop_words_ids`); InternLM2's unused pieces run
# [UNUSED_TOKEN_0] .. [UNUSED_TOKEN_146] to the end of its 92544-entry vocabulary (141..146 sit at
# 92538..92543, tokenizer_config.json), so 92397 is [UNUSED_TOKEN_0]: found by name, and by that id
# in a full-size vocabulary (docs/composition.md)
COMPOSE_STOP_PIECE, COMPOSE_STOP_ID, FULL_VOCAB = "[UNUSED_TOKEN_0]", 92397, 92544
# upstream's edits ask for `max_length=500 - prompt tokens` new tokens; ours never fewer than this
MIN_EDIT_TOKENS = 100


def composition_stop_ids(tok: InternLMTokenizer) -> list[int]:
    """Stop ids of the composition steps: eos, `[UNUSED_TOKEN_145]` (the end of the assistant's turn;
    upstream's stream loop breaks there) and upstream's stop word `[UNUSED_TOKEN_0]`."""
    ids = [tok.eos_token_id, tok.token_to_id(IM_END)]
    piece = tok.token_to_id(COMPOSE_STOP_PIECE)
    if piece is not None:
        ids.append(piece)
    elif tok.vocab_size == FULL_VOCAB:
        ids.append(COMPOSE_STOP_ID)
    return list(dict.fromkeys(ids))


def is_xcomposer2_config(d: dict[str, Any]) -> bool:
    """Whether a config.json dict describes an InternLM-XComposer2 checkpoint (`model_type` varies
    across its revisions; `architectures` does not)."""
    return ARCHITECTURE in (d.get("architectures") or [])



def checkpoint_tensor_names(folder: Path) -> list[str]:
    shards, weight_map, _ = _read_index(Path(folder))
    if weight_map is not None:
        return list(weight_map)
    return [k for s in shards for k in _shard_keys(s)]


def _tensor_shape(folder: Path, key: str) -> tuple[int, ...] | None:
    shards, weight_map, _ = _read_index(Path(folder))
    paths = [Path(folder) / weight_map[key]] if weight_map and key in weight_map else shards
    for p in paths:
        if p.suffix == ".safetensors":
            import safetensors
            with safetensors.safe_open(str(p), framework="pt") as f:
                if key in f.keys():
                    return tuple(f.get_slice(key).get_shape())
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            if key in sd:
                return tuple(sd[key].shape)
    return None


def checkpoint_generation(folder: Path) -> str:
    """"2.5", "4khd" or "2" for an InternLMXComposer2ForCausalLM folder: the high-resolution models
    hold `plora_glb_GN`; 4KHD's remote code tiles with `HD_transform`, 2.5's with `Image_transform`
    (how LMDeploy told them apart)."""
    if "plora_glb_GN" not in set(checkpoint_tensor_names(folder)):
        return "2"
    utils = Path(folder) / "ixc_utils.py"
    text = utils.read_text(encoding="utf-8", errors="replace") if utils.is_file() else ""
    if "def HD_transform" in text and "def Image_transform" not in text:
        return "4khd"
    return "2.5"


@dataclass
class XComposer2Config:
    llm: InternLM2Config
    img_size: int = 490
    max_length: int = 4096
    vision_config: dict | None = None  # CLIPVisionConfig fields; None: ViT-L/14 (vision.clip.CLIP_VIT_L14)
    plora_rank: int = PLORA_RANK
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def vision_width(self) -> int:
        return int((self.vision_config or {}).get("hidden_size", VISION_WIDTH))

    @property
    def tokens_per_image(self) -> int:
        patch = int((self.vision_config or {}).get("patch_size", 14))
        return (self.img_size // patch) ** 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "XComposer2Config":
        if not is_xcomposer2_config(d):
            raise CheckpointError(f"config.json names architectures {d.get('architectures')!r}, not "
                                  f"[{ARCHITECTURE!r}]: this is not an InternLM-XComposer2 checkpoint")
        llm = InternLM2Config.from_dict({k: v for k, v in d.items()
                                         if k not in ("vision_config", "plora_rank", "img_size", "max_length")})
        vision = d.get("vision_config")
        if vision is not None and not isinstance(vision, dict):
            raise CheckpointError(f"config.json's vision_config must be an object of CLIPVisionConfig fields, "
                                  f"got {type(vision).__name__}")
        return cls(llm=llm, img_size=int(d.get("img_size", 490)), max_length=int(d.get("max_length", 4096)),
                   vision_config=vision, plora_rank=int(d.get("plora_rank", PLORA_RANK)), raw=dict(d))

    def meta_model(self) -> tuple[nn.Module, str, list[str]]:
        """The model on the meta device for `xcomposer.parallel.sharding`'s memory planning: (model,
        decoder prefix, modules on device 0 before the token embeddings)."""
        with torch.device("meta"):
            return XComposer2(self), "llm.", ["vit", "vision_proj"]

    @classmethod
    def from_json(cls, path: str | Path) -> "XComposer2Config":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path} cannot be read as JSON ({e}); re-download config.json") from e
        return cls.from_dict(d)


def xcomposer2_vl_7b_config(img_size: int = 490) -> XComposer2Config:
    """internlm-xcomposer2-vl-7b's shapes for planning without weights: InternLM2-7B (the same shapes
    as `internlm2_5_7b_chat_config`), CLIP ViT-L/14 at `img_size` (490; -7b: 224), Partial LoRA of
    rank 256, context 4096 (config.json `max_length`)."""
    from ..llm.config import internlm2_5_7b_chat_config

    d = {**internlm2_5_7b_chat_config(torch_dtype="float16").to_dict(), "architectures": [ARCHITECTURE],
         "img_size": img_size, "max_length": 4096}
    return XComposer2Config.from_dict(d)


def _check_query(query) -> str:
    if not isinstance(query, str):
        raise TypeError(f"the query must be a string, got {type(query).__name__}")
    return check_text(query, "the query")


# upstream's (query, response) pairs, and ours with image references: one reader (vl_prompt) for both
check_history = normalize_history


def format_prompt(query: str, history: Sequence[tuple[str, str]] = (), meta_instruction: str = "") -> str:
    """Upstream's chatml prompt text (placeholders still in it)."""
    text = f"{IM_START}system\n{meta_instruction}{IM_END}\n" if meta_instruction else ""
    for q, r in history:
        text += f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{r}{IM_END}\n"
    return text + f"{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"


def prompt_parts(tokenizer: InternLMTokenizer, prompt: str, n_images: int) -> list[list[int] | int]:
    """The prompt split at each `<ImageHere>`: token ids of each non-empty part (with its own `<s>`)
    and, between them, the image index that goes there."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != n_images:
        raise ValueError(f"the prompt (history included) has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) "
                         f"but {n_images} image(s) were given: pass one image per placeholder, the images of "
                         f"earlier turns again too (as upstream's chat needs)")
    out: list[list[int] | int] = []
    for k, part in enumerate(parts):
        if part:
            out.append(tokenizer.encode(part, add_bos=True))
        if k < n_images:
            out.append(k)
    return out


class XComposer2(nn.Module):
    """Submodules under upstream's names: `vit` (CLIP tower), `vision_proj`, and `llm` (our InternLM2
    decoder with Partial LoRA; upstream's `model.*` and `output`)."""

    composition_style = "xcomposer2"  # compose.prompts.style_for: upstream XComposer2's composition prompts
    composition_task_loras: tuple[str, ...] = ()  # task LoRAs of complete() / stream_complete() (2.5: write)

    def __init__(self, config: XComposer2Config):
        super().__init__()
        self.config = config
        self.vit = ClipTower(config.img_size, config.vision_config)
        self.vision_proj = VisionProjector(self.vit.width, config.llm.hidden_size)
        self.llm = InternLMForCausalLM(config.llm).add_partial_lora(config.plora_rank)
        self.llm.context_window = config.max_length
        self.tokenizer: InternLMTokenizer | None = None
        self.meta_instruction = XCOMPOSER2_META_INSTRUCTION
        self.image_cache_size = 32
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.load_notes: list[str] = []

    # -- checkpoint keys ---------------------------------------------------------------------
    def key_map(self, key: str):
        """Upstream key -> our parameter name (a `SplitKey` for the packed wqkv and its Plora_B)."""
        if key.startswith("vit."):
            name = self.vit.key_map(key[len("vit."):])
            return None if name is None else "vit." + name
        if key.startswith("vision_proj."):
            return key
        name = internlm2_key_map(self.config.llm)(key)
        if isinstance(name, SplitKey):
            return SplitKey(tuple("llm." + n for n in name.names), name.split)
        return "llm." + name

    def checkpoint_name(self, name: str) -> str | None:
        if name.startswith("vit."):
            return "vit." + self.vit.upstream_key(name[len("vit."):])
        if name.startswith("llm."):
            return internlm2_upstream_name(name[len("llm."):])
        return name

    def vision_trainables(self) -> dict[str, torch.Tensor]:
        """The tower's and the projector's tensors being trained (requires_grad), under upstream's keys."""
        return {self.checkpoint_name(n): p.detach().cpu().contiguous() for n, p in self.named_parameters()
                if p.requires_grad and n.startswith(("vit.", "vision_proj."))}

    def load_vision_trainables(self, folder) -> list[str]:
        """Replace the tower's / projector's tensors an adapter folder carries (`finetune --train-vision /
        --train-projector`: adapter.VISION_FILE, upstream's keys), strictly; notes for load_notes."""
        from ..llm.adapter import VISION_FILE, AdapterError
        path = Path(folder) / VISION_FILE
        if not path.is_file():
            return []
        from safetensors.torch import load_file
        tensors = load_file(str(path))
        params = dict(self.named_parameters())
        for key, value in tensors.items():
            name = self.key_map(key) if key.startswith(("vit.", "vision_proj.")) else None
            p = params.get(name) if isinstance(name, str) else None
            if p is None:
                raise AdapterError(f"{path}: {key!r} is not a vision tower or projector weight of this model")
            if tuple(p.shape) != tuple(value.shape):
                raise AdapterError(f"{path}: {key!r} has shape {tuple(value.shape)} but the model's is "
                                   f"{tuple(p.shape)}: the adapter was trained on another base")
            with torch.no_grad():
                p.copy_(value.to(p.device, p.dtype))
        return [f"{len(tensors)} vision tower / projector tensors from {VISION_FILE}"]

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Upstream's keys: `model.*` / `output.*` for the decoder (wqkv packed), `vit.*`, `vision_proj.*`."""
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for k in [k for k in sd if k.startswith(prefix + "llm.")]:
            sd[prefix + k[len(prefix) + len("llm."):]] = sd.pop(k)
        return sd

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, fuse: bool = True,
                        adapter: str | os.PathLike | None = None, **quantization: Any) -> "XComposer2":
        """Load an internlm-xcomposer2-vl-7b / -7b folder (or hub id) strictly, shard by shard.

        `load_in_8bit` / `load_in_4bit` / `quantization` / `quantization_config` and the `bnb_4bit_*`
        words quantize the decoder's projections with bitsandbytes as `InternLM.from_pretrained`
        does; `quantize_vision=True` quantizes the vision tower's linears too (xcomposer.llm.quant).
        A GPTQ / AWQ folder (upstream's -4bit exports) loads as it is (xcomposer.llm.packed_quant).
        `adapter`: a peft LoRA folder on the decoder (upstream finetune.py's targets, `attention.wqkv` ...
        on every token) merged into the decoder's weights before they are quantized or fused; the
        Partial LoRA (image tokens) is left as the checkpoint has it (xcomposer.llm.adapter).
        """
        quant = resolve_quantization(**quantization)
        folder, cfg_file = checkpoint_folder(path_or_hub_id, "XComposer2")
        if cls is XComposer2:  # one architecture name, three generations: the weights tell them apart
            generation = checkpoint_generation(folder)
            if generation == "2.5":
                raise CheckpointError(f"{folder} is an InternLM-XComposer2.5 checkpoint: load it with "
                                      f"xcomposer.XComposer.from_pretrained (any generation) or "
                                      f"xcomposer.XComposer2d5.from_pretrained")
            if generation == "4khd":
                raise CheckpointError(f"{folder} is InternLM-XComposer2-4KHD (336-px HD_transform tiling), which is "
                                      f"not supported yet; internlm-xcomposer2d5-7b and internlm-xcomposer2-vl-7b are")
        packed = checkpoint_quantization(folder, quant)  # a GPTQ / AWQ folder: its own 4-bit tensors
        cfg = cls._read_config(folder, cfg_file)
        if not (folder / "tokenizer.model").is_file():
            raise CheckpointError(f"{folder / 'tokenizer.model'} not found: the checkpoint folder must hold the "
                                  f"sentencepiece tokenizer.model shipped with the weights")
        device = torch.device(device)
        check_device(device)
        dtype = resolve_dtype(dtype, device, cfg.llm.torch_dtype)
        report = None
        if device.type == "cuda":  # weights plus one full-context cache row must fit before reading
            from ..parallel import sharding
            index = device.index if device.index is not None else torch.cuda.current_device()
            report = sharding.memory_report(cfg, 1, dtype, batch=1, cache_len=cfg.max_length,
                                            budgets=[int(torch.cuda.mem_get_info(index)[0])],
                                            quantization=planned_quantization(quant, packed, device))
            print(report, file=sys.stderr)
            sharding.check_fits(report, cfg)
        with torch.device("meta"):
            model = cls(cfg)
        load_checkpoint_into(model, folder, device=quantized_target(device, quant), dtype=dtype,
                             key_map=model.key_map, checkpoint_name=model.checkpoint_name)
        if adapter is not None:
            if packed is not None:
                raise CheckpointError("adapter= merges into float weights: not with a GPTQ / AWQ folder (merge the "
                                      "adapter into the 16-bit checkpoint first: python -m xcomposer merge)")
            from ..llm.adapter import merge_adapter_
            model.load_notes.append(merge_adapter_(model.llm, adapter))
            model.load_notes += model.load_vision_trainables(adapter)
        if quant is not None:
            quantize_model_(model, quant, device)
        if packed is not None:
            prepare_packed_kernels(model)
            model.quantization = model.llm.quantization = packed
        model._finish_loading(device)
        if fuse:
            model.llm.fuse_projections()
        model.tokenizer = load_tokenizer(folder)
        for name in (IM_START, IM_END):
            if model.tokenizer.token_to_id(name) is None:
                raise CheckpointError(f"{folder / 'tokenizer.model'} has no {name} piece: XComposer2's chat "
                                      f"prompt needs it; use the checkpoint's own tokenizer.model")
        model.source = Path(folder)
        model.memory_report = report
        print(f"{Path(folder).name}: {model._loaded_note()}", file=sys.stderr)
        return model.eval()

    @classmethod
    def _read_config(cls, folder: Path, cfg_file: Path) -> XComposer2Config:
        return XComposer2Config.from_json(cfg_file)

    def _loaded_note(self) -> str:
        return f"XComposer2, {self.config.img_size} px, {self.config.tokens_per_image} tokens per image"

    def _finish_loading(self, device: torch.device) -> None:
        """Non-persistent buffers the checkpoint does not hold (CLIP's position ids)."""
        emb = self.vit.vision_tower.embeddings if not self.vit.inner else self.vit.vision_tower.vision_model.embeddings
        if hasattr(emb, "position_ids"):
            emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))
        self.llm.setup_rope(self.config.llm.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return self.llm.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    # -- images ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, img, img) preprocessed pixels -> (B, tokens_per_image, hidden) image tokens."""
        size = self.config.img_size
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 \
                or tuple(pixel_values.shape[1:]) != (3, size, size):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"encode_image expects preprocessed pixels of shape (B, 3, {size}, {size}), got {got}; "
                             f"vision.image.preprocess(images, size={size}) makes them")
        if pixel_values.is_floating_point() and not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("the pixel tensor holds NaN or infinite values; preprocess the image again")
        vdtype = self.vision_proj[0].weight.dtype
        feats = self.vit(pixel_values.to(self.device, vdtype))
        return self.vision_proj(feats).to(self.dtype)

    def _image_tokens(self, image) -> list[torch.Tensor]:
        """(tokens_per_image, hidden) per image given: paths/PIL/bytes, or (1|B, 3, H, W) pixel tensors."""
        if image is None:
            return []
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        out: list[torch.Tensor | None] = [None] * len(items)
        todo, pics = [], []
        for k, item in enumerate(items):
            if isinstance(item, torch.Tensor) and item.dim() == 4:
                out[k] = None
                todo.append((k, None))
                pics.append(item)
                continue
            key = self._cache_key(item)
            if key is not None and key in self._image_cache:
                self._image_cache.move_to_end(key)
                out[k] = self._image_cache[key]
                continue
            try:
                pics.append(load_image(item))
            except ImageError as e:
                if len(items) == 1:
                    raise
                raise ImageError(e.reason, source=e.source, index=k, total=len(items)) from e
            todo.append((k, key))
        if todo:
            tensors = [p for p in pics if isinstance(p, torch.Tensor)]
            pils = [p for p in pics if not isinstance(p, torch.Tensor)]
            encoded_pils = list(self.encode_image(preprocess(pils, size=self.config.img_size))) if pils else []
            encoded_tensors = [self.encode_image(t) for t in tensors]
            it_pil, it_t = iter(encoded_pils), iter(encoded_tensors)
            for (k, key), p in zip(todo, pics):
                if isinstance(p, torch.Tensor):
                    emb = next(it_t)
                    if emb.shape[0] != 1:
                        raise ValueError(f"a pixel tensor must hold one image, shape (1, 3, H, W); got "
                                         f"{tuple(p.shape)}")
                    out[k] = emb[0]
                else:
                    out[k] = next(it_pil)
                    if key is not None and self.image_cache_size > 0:
                        self._image_cache[key] = out[k]
                        while len(self._image_cache) > self.image_cache_size:
                            self._image_cache.popitem(last=False)
        return out  # type: ignore[return-value]

    @staticmethod
    def _cache_key(item) -> str | None:
        if isinstance(item, (str, os.PathLike)) and not str(item).startswith("data:"):
            try:
                st = os.stat(item)
                return f"{os.path.abspath(item)}|{st.st_mtime_ns}|{st.st_size}"
            except OSError:
                return None
        return None

    # -- prompts -----------------------------------------------------------------------------
    def _require_tokenizer(self) -> InternLMTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer: load it with XComposer2.from_pretrained, or set "
                               "model.tokenizer = xcomposer.load_tokenizer(folder)")
        return self.tokenizer

    @property
    def chat_format(self) -> "XComposer2ChatFormat":
        """This model's chat format: what the server, the web demo and `pipeline` build prompts with."""
        return XComposer2ChatFormat(self)

    def gen_config(self, options: dict[str, Any]) -> GenerationConfig:
        tok = self._require_tokenizer()
        stops = [tok.eos_token_id, tok.token_to_id(IM_END)]
        base = GenerationConfig(eos_token_id=stops, pad_token_id=tok.pad_token_id)
        return base.replace(**{**GEN_DEFAULTS, **options})

    def build_inputs(self, query: str, image=None, history=None,
                     meta_instruction: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(embeddings (L, hidden), image mask (L,) bool, text ids for the repetition penalty) of one
        chat turn. With images but no `<ImageHere>` anywhere, one placeholder per image is put at the
        start of the query (upstream's examples write them there; docs/checkpoint-format.md)."""
        return self._build(query, image, history, meta_instruction)[:3]

    def _plan(self, query, image, history, meta_instruction):
        """The prompt text (placeholders in), the history as read and where the images go."""
        query = _check_query(query)
        past = normalize_history(history)
        meta = self.meta_instruction if meta_instruction is None else check_text(meta_instruction, "meta_instruction")
        given = [] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
        placed = place_images(past, query, given, label=lambda first, n: IMAGE_PLACEHOLDER * n, front_rule=False,
                              ref=self.reference)
        text = format_prompt(placed.texts[-1], list(zip(placed.texts[:-1], [t[1] for t in past])), meta)
        return text, past, placed

    def prompt_length(self, query: str, image=None, history=None, meta_instruction: str | None = None) -> int:
        """Tokens of the prompt `chat` would build, from the text alone (each image is
        `tokens_per_image`): nothing is encoded. For budgets before prefill."""
        text, _, placed = self._plan(query, image, history, meta_instruction)
        parts = prompt_parts(self._require_tokenizer(), text, len(placed.images))
        return sum(self.config.tokens_per_image if isinstance(p, int) else len(p) for p in parts)

    def _build(self, query, image, history, meta_instruction):
        """`build_inputs` plus the history as read and where the images went (`PlacedPrompt`)."""
        tok = self._require_tokenizer()
        text, past, placed = self._plan(query, image, history, meta_instruction)
        images = self._image_tokens(placed.images) if placed.images else []
        parts = prompt_parts(tok, text, len(images))
        emb = self.llm.model.embed_tokens
        embeds, mask, ids = [], [], []
        for p in parts:
            if isinstance(p, int):
                embeds.append(images[p].to(self.device, self.dtype))
                mask.append(torch.ones(images[p].shape[0], dtype=torch.bool))
            else:
                embeds.append(emb(torch.tensor(p, dtype=torch.long, device=self.device)))
                mask.append(torch.zeros(len(p), dtype=torch.bool))
                ids += p
        x, m = torch.cat(embeds), torch.cat(mask)
        if x.shape[0] >= self.llm.context_window:
            raise PromptTooLongError(
                f"the prompt is {x.shape[0]} tokens ({self.config.tokens_per_image} per image) but the context "
                f"window (config.json max_length) is {self.llm.context_window}: shorten the history or send "
                f"fewer images")
        return x, m, ids, past, placed

    def prepare_chat(self, query: str, image=None, history=None, meta_instruction: str | None = None):
        """For an engine that generates elsewhere: the turn's (embeddings, image mask, text ids), and a
        function of the reply giving the history `chat` would return."""
        x, m, ids, past, placed = self._build(query, image, history, meta_instruction)
        return (x, m, ids), lambda reply: self._history_after(past, placed, reply)

    def reference(self, item) -> str:
        """What the returned history stores for an image: an absolute path, or a data URI (a PNG of
        the picture as given; a pixel tensor un-normalized)."""
        if isinstance(item, torch.Tensor):
            return to_data_uri(unnormalize(item[0]))
        if isinstance(item, (str, os.PathLike)):
            s = os.fsdecode(os.fspath(item))
            return s if s.startswith("data:") else str(Path(s).expanduser().absolute())
        return to_data_uri(item)

    def _history_after(self, past, placed, reply: str) -> list[tuple]:
        """The history `chat` returns: past turns (those that took given images now keep them) and
        the new turn, as (query, response) or, with images, (query, response, [references])."""
        out = []
        for turn, imgs in zip(past, placed.turn_images[:-1]):
            out.append((turn[0], turn[1], [self.reference(i) for i in imgs]) if imgs else (turn[0], turn[1]))
        new, q = placed.turn_images[-1], placed.texts[-1]
        out.append((q, reply, [self.reference(i) for i in new]) if new else (q, reply))
        return out

    def _answer(self, tokens: list[int]) -> str:
        tok = self._require_tokenizer()
        stops = {tok.eos_token_id, tok.token_to_id(IM_END)}
        cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        return tok.decode(tokens[:cut], skip_special_tokens=True).split(IM_END)[0]

    # -- the chat API --------------------------------------------------------------------------
    @staticmethod
    def _upstream_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Accept upstream's `chat(tokenizer, query=..., image=..., history=...)`: a leading
        non-string argument (the tokenizer) is dropped; ours is `model.tokenizer`."""
        if args and not isinstance(args[0], str):
            args = args[1:]
        kwargs.pop("tokenizer", None)
        if "query" in kwargs:
            kwargs["text"] = kwargs.pop("query")
        return args, kwargs

    @torch.inference_mode()
    def generate(self, text: str, image=None, **options: Any) -> str:
        """One question (with optional image(s)) -> the answer, upstream's chat defaults."""
        reply, _ = self.chat(text, image=image, history=None, **options)
        return reply

    def chat(self, *args, **kwargs) -> tuple[str, list[tuple[str, str]]]:
        """One turn: `(reply, history + [(query, reply)])`; the given list is not modified."""
        args, kwargs = self._upstream_args(args, kwargs)
        return self._chat(*args, **kwargs)

    def _turn(self, text, image, history, meta_instruction, options: dict[str, Any], stream: bool):
        """What a chat turn generates from: (embeddings, image mask, text ids, the history read, where
        the images went, the GenerationConfig, extra generate() arguments)."""
        cfg = self.gen_config({**STREAM_DEFAULTS, **options} if stream else options)
        with torch.inference_mode():
            x, m, ids, past, placed = self._build(text, image, history, meta_instruction)
        return x, m, ids, past, placed, cfg, {}

    def _chat(self, text: str, image=None, history=None, meta_instruction: str | None = None,
              **options: Any) -> tuple[str, list[tuple[str, str]]]:
        x, m, ids, past, placed, cfg, extra = self._turn(text, image, history, meta_instruction, options, False)
        with torch.inference_mode():
            out = generate(self.llm, inputs_embeds=[x], image_mask=[m], penalty_ids=[ids], config=cfg, **extra)
        reply = self._answer(out.tokens[0])
        return reply, self._history_after(past, placed, reply)

    def stream_chat(self, *args, **kwargs) -> ChatStream:
        """Like `chat`, as text pieces; afterwards `stream.reply` and `stream.history` are set."""
        args, kwargs = self._upstream_args(args, kwargs)
        return self._stream_chat(*args, **kwargs)

    def _stream_chat(self, text: str, image=None, history=None, meta_instruction: str | None = None,
                     **options: Any) -> ChatStream:
        x, m, ids, past, placed, cfg, extra = self._turn(text, image, history, meta_instruction, options, True)
        tok = self._require_tokenizer()
        stops = set(cfg.stop_ids)

        def pieces() -> Iterator[str]:
            reply = ""
            chunks = stream_generate(self.llm, inputs_embeds=x, image_mask=m, penalty_ids=ids, config=cfg, **extra)
            for new in text_until_stop(tok, chunks, stops):
                reply += new
                yield new
            stream.reply, stream.history = reply, self._history_after(past, placed, reply)

        stream = ChatStream(pieces())
        return stream

    # -- composition (complete prompt strings) ------------------------------------------------------
    def raw_prompt(self, prompt: str, image=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(embeddings, image mask, text ids) of a complete prompt string, template included, with one
        image per `<ImageHere>` (upstream composition's `<image>`). As its `interleav_wrap`: the text
        is split at the slots, each non-empty part tokenized on its own, and only the first one gets
        `<s>` (unlike chat, where every part does)."""
        tok = self._require_tokenizer()
        if not isinstance(prompt, str):
            raise TypeError(f"the prompt must be a string, got {type(prompt).__name__}")
        prompt = check_text(prompt, "the prompt")
        parts = prompt.split(IMAGE_PLACEHOLDER)
        images = self._image_tokens(image)
        if len(parts) - 1 != len(images):
            raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} "
                             f"image(s) were given: pass one image per placeholder")
        emb = self.llm.model.embed_tokens
        embeds, mask, ids, bos = [], [], [], True
        for k, part in enumerate(parts):
            if part:
                p = tok.encode(part, add_bos=bos)
                bos = False
                embeds.append(emb(torch.tensor(p, dtype=torch.long, device=self.device)))
                mask.append(torch.zeros(len(p), dtype=torch.bool))
                ids += p
            if k < len(images):
                embeds.append(images[k].to(self.device, self.dtype))
                mask.append(torch.ones(images[k].shape[0], dtype=torch.bool))
        if not embeds:
            raise ValueError("the prompt is empty: give some text")
        x, m = torch.cat(embeds), torch.cat(mask)
        if x.shape[0] >= self.llm.context_window:
            raise PromptTooLongError(
                f"the prompt is {x.shape[0]} tokens ({self.config.tokens_per_image} per image) but the context window "
                f"(config.json max_length) is {self.llm.context_window}: shorten the text or send fewer images")
        return x, m, ids

    def _completion(self, prompt: str, image, options: dict[str, Any]):
        """Inputs and config of a composition step. `penalize_prompt`: the repetition penalty counts
        the prompt's text ids (upstream's steps sent as input_ids); `max_length`: upstream's edit
        budget, prompt included (at least MIN_EDIT_TOKENS new tokens). The reply is cut to the room
        the context window has left."""
        options = dict(options)
        penalize = bool(options.pop("penalize_prompt", False))
        max_length = options.pop("max_length", None)
        tok = self._require_tokenizer()
        with torch.inference_mode():
            x, m, ids = self.raw_prompt(prompt, image)
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
                raise ValueError(f"invalid generation option max_length={max_length!r}: must be an integer >= 1")
            options.setdefault("max_new_tokens", max(max_length - x.shape[0], MIN_EDIT_TOKENS))
        base = GenerationConfig(eos_token_id=composition_stop_ids(tok), pad_token_id=tok.pad_token_id)
        cfg = base.replace(**{**GEN_DEFAULTS, **options})
        return x, m, (ids if penalize else None), cfg

    @torch.inference_mode()
    def complete(self, prompt: str, image=None, **options: Any) -> str:
        """Continue a complete prompt string (see `raw_prompt`); the text up to the first stop token."""
        x, m, pen, cfg = self._completion(prompt, image, options)
        out = generate(self.llm, inputs_embeds=[x], image_mask=[m], penalty_ids=None if pen is None else [pen],
                       config=cfg, task_loras=self.composition_task_loras)
        return self._cut(out.tokens[0], cfg)

    def stream_complete(self, prompt: str, image=None, **options: Any) -> Iterator[str]:
        """`complete`, as text pieces while they are generated (whole characters only)."""
        x, m, pen, cfg = self._completion(prompt, image, options)
        chunks = stream_generate(self.llm, inputs_embeds=x, image_mask=m, penalty_ids=pen, config=cfg,
                                 task_loras=self.composition_task_loras)
        return text_until_stop(self._require_tokenizer(), chunks, set(cfg.stop_ids))

    def _cut(self, tokens: list[int], cfg: GenerationConfig) -> str:
        stops = set(cfg.stop_ids)
        cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        return self._require_tokenizer().decode(tokens[:cut], skip_special_tokens=True)

    def compose(self, title: str, *, num_images: int | None = None, library=None, images=None,
                with_meta: bool = False, seed: int | None = None, select: bool = True, on_text=None,
                progress=None, **gen: Any):
        """Write an illustrated article from a free-form instruction (upstream XComposer2's composition:
        `xcomposer.compose.pipeline`), optionally with reference images (`images=`, at most 10)."""
        from ..compose.pipeline import compose
        return compose(self, title, library=library, num_images=num_images, images=images, with_meta=with_meta,
                       seed=seed, select=select, on_text=on_text, progress=progress, **gen)


class XComposer2ChatFormat(ChatFormat):
    """XComposer2 (internlm-xcomposer2-vl-7b, -7b): chatml with its system turn, (query, response)
    pairs or (query, response, [image references]) triples, each image at its `<ImageHere>` (one per
    image at the start of a message that has none). The oldest exchanges are left out with their
    images; each image counts `tokens_per_image`, so the budget is known before anything is encoded."""

    family = "xcomposer2"
    takes_images = True
    has_system_turn = True

    @property
    def context_window(self) -> int:
        return self.model.llm.context_window

    def generation_config(self, options=None, *, completion: bool = False) -> GenerationConfig:
        """`chat()`'s defaults (sampling, temperature 1.0, top_p 0.8, repetition penalty 1.005, 1024 new
        tokens); stops on `</s>` and `<|im_end|>`. Completions use the same."""
        return self.model.gen_config(dict(options or {}))

    def check_history(self, history) -> list:
        return normalize_history(history)

    # -- the family's hooks (XComposer2.5 overrides them) ------------------------------------------
    def _message_text(self, m: Message) -> str:
        return m.layout if m.layout is not None else m.text

    def _meta(self, system: str | None) -> dict[str, Any]:
        return {} if system is None else {"meta_instruction": system}

    def _request(self, request: dict[str, Any]) -> tuple[str, ...]:
        """The request's own options checked; the task LoRAs it selects."""
        return ()

    def _count(self, query, images, past, meta, request) -> tuple[int | None, list[int]]:
        n = self.model.prompt_length(query, images or None, past, **meta)
        count = len(images) + sum(len(t[2]) for t in past if len(t) == 3)
        return n, [self.model.config.tokens_per_image] * count

    def _prepare(self, query, images, past, meta, request):
        return self.model.prepare_chat(query, images or None, past, **meta)

    # -- prompts -------------------------------------------------------------------------------
    def _placed(self, query: str, images, history) -> tuple[list[tuple], list]:
        """The history with each turn's images (triples) and the query's images: upstream's way of
        passing every image again, or the triples `chat()` returns, read as `chat()` reads them."""
        past = normalize_history(history)
        placed = place_images(past, query, list(images), label=lambda first, n: "", front_rule=False,
                              ref=self.model.reference)
        turns = [(t[0], t[1], [self.model.reference(i) for i in imgs]) if imgs else (t[0], t[1])
                 for t, imgs in zip(past, placed.turn_images[:-1])]
        return turns, list(placed.turn_images[-1])

    def _fitted(self, query: str, images: list, past: list, system: str | None, cfg: GenerationConfig,
                budget: int | None, keep_first: bool, request: dict[str, Any], with_history: bool) -> ChatPrompt:
        loras = self._request(request)
        meta = self._meta(system)
        window = self.window(budget)
        shares: list[int] = []

        def measure(kept):
            n, per_image = self._count(query, images, kept, meta, request)
            shares[:] = per_image
            return n, kept

        def too_long(n: int) -> str:
            sizes = ", ".join(f"{k:,}" for k in shares) or "none"
            return (f"the prompt is {n:,} tokens (images: {sizes}) but a sequence holds {window:,} (prompt plus "
                    f"reply; the context window, or the server's --session-len): send fewer or smaller images, or "
                    f"shorten the conversation{self._too_long_hint()}")
        kept, dropped, length = fit_turns(past, measure, window, cfg.max_new_tokens, too_long, keep_first)
        history = None
        if with_history:  # chat()'s history: every turn, the left-out ones too, as the whole conversation reads
            after = self._finish(query, images, past, meta, request)
            history = lambda reply: [list(t) for t in after(reply)]  # noqa: E731
        return ChatPrompt(build=lambda: self._prepare(query, images, kept, meta, request)[0], length=length or 0,
                          dropped=dropped, history=history, task_loras=loras)

    def _finish(self, query, images, past, meta, request):
        """A function of the reply giving the history `chat()` returns after this turn (nothing encoded)."""
        _, read, placed = self.model._plan(query, images or None, past, meta.get("meta_instruction"))
        return lambda reply: self.model._history_after(read, placed, reply)

    def _too_long_hint(self) -> str:
        return ""

    def _prompt(self, messages, system, cfg, budget, keep_first, **request) -> ChatPrompt:
        past = []
        for k in range(0, len(messages) - 1, 2):
            user, bot = messages[k], messages[k + 1]
            text = self._message_text(user)
            past.append((text, bot.text, list(user.images)) if user.images else (text, bot.text))
        last = messages[-1]
        try:
            return self._fitted(self._message_text(last), list(last.images), past, system, cfg, budget, keep_first,
                                request, False)
        except (ChatFormatError, PromptTooLongError):
            raise
        except ValueError as e:  # placeholders and images that do not match, hd_num, infer_mode
            raise ChatFormatError(str(e), "infer_mode" if "infer_mode" in str(e) else
                                  "hd_num" if "hd_num" in str(e) else "messages") from e

    def turn(self, query, images, history, cfg, *, budget=None, keep_first=False) -> ChatPrompt:
        past, given = self._placed(query, images, history)
        return self._fitted(query, given, past, None, cfg, budget, keep_first, {}, True)

    def _stream_text(self, made: ChatPrompt, cfg: GenerationConfig) -> Iterator[str]:
        with torch.inference_mode():
            x, m, ids = made.build()
        chunks = stream_generate(self.model.llm, inputs_embeds=x, image_mask=m, penalty_ids=ids, config=cfg,
                                 task_loras=made.task_loras or None)
        return text_until_stop(self.tokenizer, chunks, set(cfg.stop_ids))

    def completion_prompt(self, text: str, cfg: GenerationConfig) -> ChatPrompt:
        """A complete prompt string: text only, its ids as the tokenizer gives them."""
        if IMAGE_PLACEHOLDER in text:
            raise ChatFormatError(f"/v1/completions takes text only; send images through /v1/chat/completions "
                                  f"(the prompt contains {IMAGE_PLACEHOLDER})", "prompt")
        ids = self.tokenizer.encode(text, add_bos=True)
        return ChatPrompt(ids=ids, length=len(ids))


__all__ = ["XComposer2", "XComposer2ChatFormat", "checkpoint_generation", "XComposer2Config", "ChatStream", "GEN_DEFAULTS", "XCOMPOSER2_META_INSTRUCTION",
           "ARCHITECTURE", "IM_START", "IM_END", "PLORA_RANK", "is_xcomposer2_config", "format_prompt",
           "prompt_parts", "check_history", "xcomposer2_vl_7b_config", "composition_stop_ids"]
