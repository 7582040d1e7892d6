"""`XComposer`: EVA ViT-g + perceive sampler + InternLM decoder, loading the public checkpoints.

    from xcomposer import XComposer
    model = XComposer.from_pretrained("internlm/internlm-xcomposer-7b", device="cuda", dtype=torch.float16)
    text = model.generate("Describe the image", image="cat.jpg")
    reply, history = model.chat("Who is this?", image="a.jpg")
    stream = model.stream_chat("And then?", history=history)
    for piece in stream: print(piece, end="")
    history = stream.history

The checkpoint is read with upstream's own key names (`visual_encoder.*`, `ln_vision.*`,
`Qformer.bert.*`, `query_tokens`, `internlm_proj.*`, `flag_image_*`, `internlm_model.*`) and
mapped explicitly onto our modules; LoRA adapters in the LLM are merged into the base weights at
load time. Facts and sources: docs/checkpoint-format.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from projector.sampler import PerceiveSampler, SamplerConfig, sampler_key_map, sampler_to_checkpoint
from vision.eva import EvaConfig, VisionTower, vision_key_map, vision_to_checkpoint
from vision.image import IMAGE_SIZE, ImageError, load_image, preprocess, to_data_uri, unnormalize

from ..llm.checkpoint import CheckpointError, LoRAMerge, checkpoint_folder, load_checkpoint_into, remote_code_defines
from ..llm.chat import fit_turns
from ..llm.chat_format import ChatFormat, ChatFormatError, ChatPrompt
from ..llm.config import InternLMConfig
from ..llm.decoder import InternLMForCausalLM
from ..llm.generation import GenerationConfig, GenerationOutput, PromptTooLongError, generate, stream_generate
from ..llm.internlm import check_device, resolve_dtype
from ..llm.quant import QuantizationError, quantize_model_, quantized_target, resolve_quantization
from ..llm.tokenizer import InternLMTokenizer, load_tokenizer
from .vl_prompt import (IMAGE_PLACEHOLDER, ChatStream, ImageSlot, bot_turn, check_history, prompt_segments,
                        segments_length, text_until_stop, user_turn)

# upstream InternLMXComposerForCausalLM.gen_config; min_length=1 over an embeddings-only prompt
# is one new token at least
GEN_DEFAULTS = dict(num_beams=5, do_sample=False, min_new_tokens=1, repetition_penalty=1.5, length_penalty=1.0,
                    temperature=1.0, max_new_tokens=200)

# The two v1 repositories differ only in their remote code (docs/checkpoint-format.md, "Variants"):
# internlm-xcomposer-7b puts this meta instruction before the first " <|User|>:", generates up to 500
# new tokens and also stops on <eoh>; internlm-xcomposer-vl-7b has none of that.
XCOMPOSER_META_INSTRUCTION = (
    "meta instruction\nYou are an AI assistant whose name is 浦语.\n"
    "- 浦语 is a conversational language model that is developed by Shanghai AI Laboratory (上海人工智能实验室). "
    "It is designed to be helpful, honest, and harmless.\n"
    "- 浦语 can understand and communicate fluently in the language chosen by the user such as English and 中文.\n"
    "conversation\n")
VARIANTS = {
    "7b": dict(meta_instruction=XCOMPOSER_META_INSTRUCTION, max_new_tokens=500, stop_on_eoh=True),
    "vl-7b": dict(meta_instruction="", max_new_tokens=200, stop_on_eoh=False),
}
REMOTE_CODE_FILE = "modeling_InternLM_XComposer.py"


def is_xcomposer_config(d: dict[str, Any]) -> bool:
    """Whether a config.json dict describes an InternLM-XComposer (v1) checkpoint."""
    return "num_query_token" in d or "internlm_lora" in d or d.get("model_type") == "InternLMXComposer"


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown XComposer variant {variant!r}: use '7b' (internlm-xcomposer-7b: meta instruction, "
                         f"500 new tokens) or 'vl-7b' (internlm-xcomposer-vl-7b)")
    return variant


def variant_of(folder: Path, source: str | os.PathLike) -> tuple[str, str]:
    """(variant, what decided it) for a v1 checkpoint folder loaded from `source` (path or hub id).

    The remote-code file decides: only -7b's defines `meta_instruction` (read as text, never run).
    Without it, the hub id or folder name is the hint; without a hint, 'vl-7b' (no meta instruction)."""
    code = Path(folder) / REMOTE_CODE_FILE
    if code.is_file():
        if remote_code_defines(code, "meta_instruction"):
            return "7b", f"{REMOTE_CODE_FILE} defines meta_instruction"
        return "vl-7b", f"{REMOTE_CODE_FILE} has no meta_instruction"
    name = Path(os.fspath(source)).name.lower()
    if "xcomposer-vl-7b" in name:
        return "vl-7b", f"no {REMOTE_CODE_FILE}; the name {name!r} says -vl-7b"
    if "xcomposer-7b" in name:
        return "7b", f"no {REMOTE_CODE_FILE}; the name {name!r} says -7b"
    return "vl-7b", (f"no {REMOTE_CODE_FILE} and no variant in the name {name!r}: assuming vl-7b (no meta "
                     f"instruction); pass variant='7b' for internlm-xcomposer-7b")

# InternLMXComposerConfig's defaults (configuration_InternLM_XComposer.py) for fields a
# config.json may leave out
_UPSTREAM_DEFAULTS = dict(rms_norm_eps=1e-5, num_query_token=32, intern_converted_llm=True, kqvo_bias=True,
                          internlm_lora=None, pad_token_id=-1)


@dataclass
class XComposerConfig:
    """The three parts' shapes, read from an upstream XComposer `config.json`.

    Upstream's file describes the LLM (InternLM field names), `num_query_token`, `kqvo_bias`,
    `intern_converted_llm` and `internlm_lora`; the vision tower and Q-Former have fixed
    shapes there (EVA ViT-g, BERT-base). Our optional `vision_config` / `qformer_config` entries
    override those shapes; upstream ignores them, and tiny test checkpoints use them.
    """

    llm: InternLMConfig
    vision: EvaConfig = field(default_factory=EvaConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    lora: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def lora_scale(self) -> float | None:
        if not self.lora:
            return None
        return float(self.lora["lora_alpha"]) / float(self.lora["lora_r"])

    @property
    def tokens_per_image(self) -> int:
        return self.sampler.tokens_per_image

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "XComposerConfig":
        if not is_xcomposer_config(d):
            raise CheckpointError(
                f"config.json describes model_type={d.get('model_type')!r}, not an InternLM-XComposer checkpoint "
                f"(no num_query_token / internlm_lora fields); for a plain InternLM chat checkpoint use "
                f"xcomposer.InternLM.from_pretrained")
        full = {**_UPSTREAM_DEFAULTS, **d}
        llm_fields = dict(full)
        # the converted attention (intern_converted_llm) carries biases on q/k/v/o when kqvo_bias is set;
        # the other attention class has none
        llm_fields["bias"] = bool(full["kqvo_bias"]) if full["intern_converted_llm"] else False
        # upstream's XComposer attention applies plain RoPE (base 10000), no dynamic NTK scaling
        llm_fields.setdefault("rotary", {"base": 10000, "type": "origin"})
        if llm_fields.get("pad_token_id", 0) < 0:
            llm_fields["pad_token_id"] = 0
        llm = InternLMConfig.from_dict(llm_fields)
        vision = EvaConfig.from_dict(full.get("vision_config") or {})
        qf = {"num_query_token": full["num_query_token"], "encoder_width": vision.width,
              "llm_hidden_size": llm.hidden_size, **(full.get("qformer_config") or {})}
        sampler = SamplerConfig.from_dict(qf)
        lora = full["internlm_lora"]
        if lora is not None:
            for name in ("lora_r", "lora_alpha"):
                if not isinstance(lora.get(name), (int, float)) or lora[name] <= 0:
                    raise CheckpointError(f"config.json internlm_lora.{name}={lora.get(name)!r} must be a positive "
                                          f"number; the file is damaged")
        return cls(llm=llm, vision=vision, sampler=sampler, lora=lora, raw=dict(d))

    @classmethod
    def from_json(cls, path: str | Path) -> "XComposerConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); re-download config.json") from e
        return cls.from_dict(d)

    def meta_model(self) -> tuple[nn.Module, str, list[str]]:
        """The model on the meta device for `xcomposer.parallel.sharding`'s memory planning: (model,
        decoder prefix, modules that go on device 0 before the token embeddings)."""
        with torch.device("meta"):
            return XComposer(self), "llm.", ["vision", "sampler"]


def xcomposer_7b_config() -> XComposerConfig:
    """The full-size internlm-xcomposer-7b shapes (docs/checkpoint-format.md): InternLM-7B (32 layers,
    hidden 4096, 32 heads, SwiGLU 11008, vocab 103168, q/k/v/o biases), EVA ViT-g/14 at 224 px
    (39 blocks, width 1408), the BERT-base Q-Former with 64 queries, fp16."""
    return XComposerConfig.from_dict({"model_type": "InternLMXComposer", "num_query_token": 64,
                                      "internlm_lora": None, "torch_dtype": "float16"})


def checkpoint_key_map(key: str) -> str | None:
    """Upstream checkpoint key -> our module path (None drops it; unknown keys pass through so the
    strict loader reports them)."""
    if key.startswith("internlm_model."):
        return "llm." + key[len("internlm_model."):]
    if key.startswith(("visual_encoder.", "ln_vision.")):
        mapped = vision_key_map(key)
        return None if mapped is None else "vision." + mapped
    if key.startswith(("Qformer.", "internlm_proj.")) or key in ("query_tokens", "flag_image_start",
                                                                   "flag_image_end"):
        mapped = sampler_key_map(key)
        return None if mapped is None else "sampler." + mapped
    return key


def checkpoint_name(our_key: str) -> str | None:
    """Our module path -> the upstream checkpoint key (for error messages)."""
    part, _, rest = our_key.partition(".")
    try:
        if part == "llm":
            return "internlm_model." + rest
        if part == "vision":
            return vision_to_checkpoint(rest)
        if part == "sampler":
            return sampler_to_checkpoint(rest)
    except KeyError:
        return None
    return None


def _skip_derived(key: str) -> bool:
    # upstream shards carry the rotary inverse frequencies, which the model derives itself
    return key.endswith("rotary_emb.inv_freq")


class XComposer(nn.Module):
    """The vision-language model. Submodules: `vision` (EVA ViT-g + ln_vision), `sampler` (Q-Former,
    projection and image flags) and `llm` (our InternLM decoder)."""

    def __init__(self, config: XComposerConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision)
        self.sampler = PerceiveSampler(config.sampler)
        self.llm = InternLMForCausalLM(config.llm)
        self.tokenizer: InternLMTokenizer | None = None
        self.image_cache_size = 32
        self._image_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.variant = "vl-7b"  # "7b" or "vl-7b" (VARIANTS), set by from_pretrained
        self.load_notes: list[str] = []
        self.vision_graphs = None  # fast_decode.ImageEncoderGraphs once use_cuda_graphs(model) ran
        self.memory_report = None  # sharding.MemoryReport printed by from_pretrained on GPUs

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, num_gpus: int = 1,
                        fuse: bool = True, variant: str | None = None, adapter: str | os.PathLike | None = None,
                        **quantization: Any) -> "XComposer":
        """Load an internlm-xcomposer-7b / -vl-7b folder or hub id strictly, shard by shard.

        Every checkpoint key must map onto the model and every model tensor must be provided;
        LoRA adapters (`*.lora_A.weight`, `*.lora_B.weight`) are merged into their base weights.
        `num_gpus` > 1 spreads the model over cuda:0 .. cuda:N-1 (`device` is then not used) by the
        balanced placement of `xcomposer.parallel.sharding`, printing its memory report before any weight
        is read; each tensor is loaded straight onto its GPU. On one GPU the report (weights + a
        cache of one full-context row) is printed too, and not fitting in the free memory is a
        `sharding.ShardingError` before anything is read. `fuse` packs the decoder's q/k/v
        and gate/up projections once loaded (`InternLMForCausalLM.fuse_projections`).
        `variant` ("7b" or "vl-7b") overrides what the folder's remote code says (`variant_of`);
        the deciding reason is printed and kept in `model.load_notes`.
        `load_in_8bit` / `load_in_4bit` / `quantization` / `quantization_config` and the `bnb_4bit_*`
        words quantize the decoder's projections with bitsandbytes as `InternLM.from_pretrained`
        does; `quantize_vision=True` quantizes the vision tower's linears too (xcomposer.llm.quant).
        """
        quant = resolve_quantization(**quantization)
        if quant is not None and num_gpus != 1:
            raise QuantizationError("8-bit / 4-bit weights load on one device: drop num_gpus (a 4-bit model needs "
                                    "about a quarter of the 16-bit memory)")
        if variant is not None:
            check_variant(variant)
        if num_gpus != 1:
            from ..parallel import sharding
            sharding.require_gpus(num_gpus)
            device = "cuda:0"
        folder, cfg_file = checkpoint_folder(path_or_hub_id, "XComposer")
        from .xcomposer2 import XComposer2, checkpoint_generation, is_xcomposer2_config
        try:
            raw = json.loads(Path(cfg_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        if isinstance(raw, dict) and is_xcomposer2_config(raw):  # one loader for every generation
            if num_gpus != 1 or variant is not None:
                raise ValueError("num_gpus > 1 and variant= apply to XComposer 1.0 checkpoints; this folder is "
                                 "an InternLM-XComposer2 checkpoint (load it on one device)")
            if checkpoint_generation(folder) == "2.5":
                from .xcomposer2d5 import XComposer2d5
                return XComposer2d5.from_pretrained(folder, device=device, dtype=dtype, fuse=fuse, quantization=quant,
                                                    adapter=adapter)
            return XComposer2.from_pretrained(folder, device=device, dtype=dtype, fuse=fuse, quantization=quant,
                                              adapter=adapter)
        if adapter is not None:
            raise ValueError("adapter= applies to XComposer2 / 2.5 and InternLM checkpoints; XComposer 1.0 merges the "
                             "LoRA its own checkpoint carries (internlm-xcomposer-7b): drop adapter=")
        cfg = XComposerConfig.from_json(cfg_file)
        if not (folder / "tokenizer.model").is_file():
            raise CheckpointError(f"{folder / 'tokenizer.model'} not found: the checkpoint folder must hold the "
                                  f"sentencepiece tokenizer.model shipped with the weights")
        device = torch.device(device)
        check_device(device)
        dtype = resolve_dtype(dtype, device, cfg.llm.torch_dtype)
        plan = report = None
        if num_gpus != 1:  # fail on memory before reading gigabytes
            plan = report = sharding.memory_report(cfg, num_gpus, dtype, batch=sharding.DEFAULT_KV_BATCH,
                                                   budgets=sharding.cuda_budgets(num_gpus))
        elif device.type == "cuda":  # one GPU: weights plus one row of a full-context cache must fit
            from ..parallel import sharding
            index = device.index if device.index is not None else torch.cuda.current_device()
            report = sharding.memory_report(cfg, 1, dtype, batch=1, budgets=[int(torch.cuda.mem_get_info(index)[0])],
                                            quantization=quant)
        if report is not None:
            print(report, file=sys.stderr)
            sharding.check_fits(report, cfg)
        with torch.device("meta"):
            model = cls(cfg)
        lora = LoRAMerge(cfg.lora_scale) if cfg.lora else None
        target = quantized_target(device, quant) if plan is None else \
            (lambda name: f"cuda:{sharding.device_of(name, plan.device_map)}")
        load_checkpoint_into(model, folder, device=target, dtype=dtype, key_map=checkpoint_key_map,
                             skip=_skip_derived, lora=lora, checkpoint_name=checkpoint_name)
        if quant is not None:
            quantize_model_(model, quant, device)
        model.finish_loading(device)
        if fuse:
            model.llm.fuse_projections()
        if plan is not None:
            sharding.dispatch(model, plan.device_map, main_device=0)
        model.memory_report = report
        model.tokenizer = load_tokenizer(folder)
        model.source = Path(folder)
        model.variant, why = (variant, "variant= given") if variant is not None else variant_of(folder, path_or_hub_id)
        model.load_notes = [f"variant {model.variant} ({why})"]
        print(f"XComposer {Path(folder).name}: " + "; ".join(model.load_notes), file=sys.stderr)
        return model.eval()

    def finish_loading(self, device: torch.device | str) -> None:
        """Rebuild what checkpoints do not store (rotary tables, non-persistent buffers)."""
        self.vision.init_non_persistent(torch.device(device))
        self.llm.setup_rope(self.config.llm.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.lm_head.weight.dtype

    # -- images ------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, 224, 224) preprocessed pixels -> (B, 66, hidden): start flag, 64 queries, end flag."""
        self._check_pixels(pixel_values)
        x = pixel_values.to(device=self.device, dtype=self.vision_dtype)
        embeds = self.vision_graphs(x) if self.vision_graphs is not None else None
        if embeds is None:  # eager (also when no captured path applies, e.g. off CUDA)
            embeds = self.sampler(self.vision(x))
        return embeds.to(self.dtype)

    def _check_pixels(self, pixel_values) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"encode_image expects preprocessed pixels of shape (B, 3, H, W), got {got}; "
                             f"use vision.image.preprocess(images) to make them")
        size = self.config.vision.img_size
        if tuple(pixel_values.shape[2:]) != (size, size):
            raise ValueError(f"encode_image expects {size}x{size} pixels, got {tuple(pixel_values.shape[2:])}; "
                             f"preprocess(images, size={size}) resizes them")
        if pixel_values.is_floating_point() and not bool(torch.isfinite(pixel_values).all()):
            raise ValueError("the pixel tensor holds NaN or infinite values; preprocess the image again")

    @property
    def vision_dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    def _image_embeds(self, refs: Sequence[str], fresh: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """(66, hidden) per image reference; recent ones come from a small cache."""
        out: list[torch.Tensor | None] = [None] * len(refs)
        todo: list[int] = []
        for i, ref in enumerate(refs):
            if ref in fresh:
                out[i] = fresh[ref]
            elif (key := self._cache_key(ref)) in self._image_cache:
                self._image_cache.move_to_end(key)
                out[i] = self._image_cache[key]
            else:
                todo.append(i)
        if todo:
            try:
                images = [load_image(refs[i]) for i in todo]
            except ImageError as e:
                raise ImageError(f"an image of the conversation cannot be loaded again: {e.reason}",
                                 source=e.source) from e
            embeds = self.encode_image(preprocess(images, size=self.config.vision.img_size))
            for i, e in zip(todo, embeds):
                out[i] = e
                self._remember(refs[i], e)
        return out  # type: ignore[return-value]

    def _cache_key(self, ref: str) -> str:
        if ref.startswith("data:"):
            return ref
        try:
            st = os.stat(ref)
            return f"{ref}|{st.st_mtime_ns}|{st.st_size}"
        except OSError:
            return ref

    def _remember(self, ref: str, embeds: torch.Tensor) -> None:
        if self.image_cache_size <= 0:
            return
        self._image_cache[self._cache_key(ref)] = embeds
        while len(self._image_cache) > self.image_cache_size:
            self._image_cache.popitem(last=False)

    def _store_images(self, image) -> tuple[list[str], dict[str, torch.Tensor]]:
        """References to keep in the history for `image` (one or a list), plus embeddings computed
        now for inputs that are already tensors of pixels."""
        if image is None:
            return [], {}
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        refs: list[str] = []
        fresh: dict[str, torch.Tensor] = {}
        for k, item in enumerate(items):
            try:
                ref = self._store_one(item, fresh)
            except ImageError as e:
                if len(items) == 1:
                    raise
                raise ImageError(e.reason, source=e.source, index=k, total=len(items)) from e
            except ValueError as e:
                raise ValueError(f"image {k + 1} of {len(items)}: {e}" if len(items) > 1 else str(e)) from e
            refs.append(ref)
        return refs, fresh

    def _store_one(self, item, fresh: dict[str, torch.Tensor]) -> str:
        if isinstance(item, torch.Tensor) and item.dim() == 4:
            # upstream accepts preprocessed pixels; the history keeps the picture they show (8-bit)
            if item.shape[0] != 1:
                raise ValueError(f"a pixel tensor must hold one image, shape (1, 3, H, W); got "
                                 f"{tuple(item.shape)}")
            self._check_pixels(item)  # before un-normalising, which needs 3 channels
            ref = to_data_uri(_unnormalize(item[0]))
            fresh[ref] = self.encode_image(item)[0]
            return ref
        if isinstance(item, (str, os.PathLike)) and not str(item).startswith("data:"):
            if "://" in os.fsdecode(os.fspath(item)):
                load_image(item)  # vision refuses URLs with its own message before any path handling
            path = Path(item).expanduser().absolute()
            load_image(path)  # refuse a bad file now, with its name, not deep inside generation
            return str(path)
        picture = load_image(item)
        # the model sees a (224, 224) bicubic resize; storing exactly that keeps replays identical
        size = self.config.vision.img_size
        return to_data_uri(picture.resize((size, size), _bicubic()))

    # -- prompts -----------------------------------------------------------------------------
    def _require_tokenizer(self) -> InternLMTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer: load it with XComposer.from_pretrained, or set "
                               "model.tokenizer = xcomposer.load_tokenizer(folder)")
        return self.tokenizer

    def _gen_config(self, options: dict[str, Any]) -> GenerationConfig:
        tok = self._require_tokenizer()
        options = dict(options)
        if "min_length" in options:  # upstream's name: over an embeddings-only prompt it counts new tokens
            options["min_new_tokens"] = options.pop("min_length")
        spec = VARIANTS[self.variant]
        merged = {**GEN_DEFAULTS, "max_new_tokens": spec["max_new_tokens"], **options}
        stops = [tok.eos_token_id, tok.eoa_token_id] + ([tok.eoh_token_id] if spec["stop_on_eoh"] else [])
        base = GenerationConfig(eos_token_id=stops, pad_token_id=tok.pad_token_id)
        return base.replace(**merged)

    @property
    def chat_format(self) -> "XComposerChatFormat":
        """This model's chat format: what the server, the web demo and `pipeline` build prompts with."""
        return XComposerChatFormat(self)

    @property
    def meta_instruction(self) -> str:
        """The text before the first user tag ("" for vl-7b)."""
        return VARIANTS[self.variant]["meta_instruction"]

    def plan_prompt(self, turns: Sequence[dict[str, Any]], reply_room: int, window: int | None = None,
                    keep_first: bool = False) -> tuple[list, list[str], int, int]:
        """(segments, image references, how many of the oldest exchanges were left out, tokens) of
        `turns` (history + the new user turn) so the prompt plus `reply_room` new tokens fit `window`
        (default the context window); nothing is encoded."""
        tok = self._require_tokenizer()
        per_image = self.config.tokens_per_image
        window = self.llm.context_window if window is None else min(window, self.llm.context_window)
        turns = list(turns)
        exchanges = [turns[k:k + 2] for k in range(0, len(turns) - 1, 2)]

        def measure(kept):
            segs, refs = prompt_segments(tok, [t for ex in kept for t in ex] + turns[-1:], self.meta_instruction)
            return segments_length(segs, per_image), (segs, refs)
        (segs, refs), dropped, n = fit_turns(exchanges, measure, window, reply_room, keep_first=keep_first,
                                             too_long=lambda n: (
            f"the question is {n} tokens (images count {per_image} each) but the context window is {window}: "
            f"shorten the question or send fewer images"))
        return segs, refs, dropped, n

    def build_prompt(self, turns: Sequence[dict[str, Any]], cfg: GenerationConfig,
                     fresh: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, int]:
        """Embeddings (L, hidden) of `turns` (history + the new user turn) and how many of the oldest
        exchanges were left out so the prompt plus the reply fit the context window."""
        segs, refs, dropped, _ = self.plan_prompt(turns, cfg.max_new_tokens)
        return self.embed_segments(segs, refs, fresh), dropped

    def embed_segments(self, segs, refs: Sequence[str], fresh: dict[str, torch.Tensor] | None) -> torch.Tensor:
        images = self._image_embeds(refs, fresh or {})
        emb = self.llm.model.embed_tokens
        parts = [images[s.index] if isinstance(s, ImageSlot)
                 else emb(torch.tensor(s, dtype=torch.long, device=self.device)) for s in segs if
                 isinstance(s, ImageSlot) or s]
        return torch.cat([p.to(self.dtype) for p in parts])

    def raw_prompt(self, prompt: str, image=None, max_new_tokens: int = 0) -> torch.Tensor:
        """Embeddings (L, hidden) of a complete prompt string, template included, with one image per
        `<ImageHere>`; pieces are tokenized on their own and `<s>` starts the prompt (upstream's
        composition prompts are built this way)."""
        tok = self._require_tokenizer()
        refs, fresh = self._store_images(image)
        parts = prompt.split(IMAGE_PLACEHOLDER)
        if len(parts) - 1 != len(refs):
            raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but "
                             f"{len(refs)} image(s) were given: pass one image per placeholder")
        segs: list = []
        for k, part in enumerate(parts):
            if part or k == 0:
                segs.append(tok.encode(part, add_bos=(k == 0)))
            if k < len(refs):
                segs.append(ImageSlot(k))
        n = segments_length(segs, self.config.tokens_per_image)
        if n + max_new_tokens > self.llm.context_window:
            raise PromptTooLongError(f"the prompt is {n} tokens (images count {self.config.tokens_per_image} "
                                     f"each); with {max_new_tokens} new tokens it exceeds the context window of "
                                     f"{self.llm.context_window}: shorten it")
        return self.embed_segments(segs, refs, fresh)

    def _completion_config(self, options: dict[str, Any]) -> GenerationConfig:
        tok = self._require_tokenizer()
        cfg = self._gen_config(options)
        if "eos_token_id" not in options:  # composition prompts also stop on <eoh>, as upstream's demo
            cfg = cfg.replace(eos_token_id=[tok.eos_token_id, tok.eoa_token_id, tok.eoh_token_id])
        return cfg

    @torch.inference_mode()
    def complete(self, prompt: str, image=None, **options: Any) -> str:
        """Continue a complete prompt string (see `raw_prompt`); the text up to the first stop token."""
        cfg = self._completion_config(options)
        embeds = self.raw_prompt(prompt, image, cfg.max_new_tokens)
        return self._answer(generate(self.llm, inputs_embeds=[embeds], config=cfg).tokens[0])

    def stream_complete(self, prompt: str, image=None, **options: Any) -> Iterator[str]:
        """`complete`, as text pieces while they are generated (whole characters only)."""
        cfg = self._completion_config(options)
        with torch.inference_mode():
            embeds = self.raw_prompt(prompt, image, cfg.max_new_tokens)
        return self._stream_text(embeds, cfg)

    def _stream_text(self, embeds: torch.Tensor, cfg: GenerationConfig) -> Iterator[str]:
        return text_until_stop(self._require_tokenizer(), stream_generate(self.llm, inputs_embeds=embeds, config=cfg),
                               set(cfg.stop_ids))

    def _answer(self, tokens: list[int]) -> str:
        tok = self._require_tokenizer()
        stops = {tok.eos_token_id, tok.eoa_token_id, tok.eoh_token_id}
        cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
        return tok.decode(tokens[:cut], skip_special_tokens=True)

    # -- the chat API --------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, text: str, image=None, **options: Any) -> str:
        """One question (with optional image(s)) -> the answer. Upstream's defaults: 5 beams,
        repetition penalty 1.5, up to 500 new tokens on -7b and 200 on -vl-7b; any option can be
        overridden."""
        reply, _ = self.chat(text, image=image, history=None, **options)
        return reply

    @torch.inference_mode()
    def chat(self, text: str, image=None, history: list[dict[str, Any]] | None = None,
             **options: Any) -> tuple[str, list[dict[str, Any]]]:
        """One turn: `(reply, history + [user turn, bot turn])`. The given list is not modified."""
        turns, fresh, cfg = self._prepare(text, image, history, options)
        embeds, _ = self.build_prompt(turns, cfg, fresh)
        out: GenerationOutput = generate(self.llm, inputs_embeds=[embeds], config=cfg)
        reply = self._answer(out.tokens[0])
        return reply, turns + [bot_turn(reply)]

    def stream_chat(self, text: str, image=None, history: list[dict[str, Any]] | None = None,
                    **options: Any) -> ChatStream:
        """Like `chat`, but iterate over the reply as text pieces (whole characters only);
        afterwards `stream.reply` and `stream.history` hold what `chat` would have returned."""
        turns, fresh, cfg = self._prepare(text, image, history, options)
        with torch.inference_mode():
            embeds, _ = self.build_prompt(turns, cfg, fresh)

        def pieces() -> Iterator[str]:
            reply = ""
            for new in self._stream_text(embeds, cfg):
                reply += new
                yield new
            stream.reply, stream.history = reply, turns + [bot_turn(reply)]

        stream = ChatStream(pieces())
        return stream

    # -- composition ---------------------------------------------------------------------------
    def compose(self, title: str, *, num_images: int | None = None, library=None, lang: str = "zh",
                select: bool = True, on_text=None, progress=None, **gen: Any):
        """Write an illustrated article from `title` (see `xcomposer.compose.pipeline`): text, image
        spots, captions, candidates from `library` (an `ImageLibrary`), the model's choice."""
        from ..compose.pipeline import compose
        return compose(self, title, library=library, num_images=num_images, lang=lang, select=select,
                       on_text=on_text, progress=progress, **gen)

    def _prepare(self, text, image, history, options):
        self._require_tokenizer()
        cfg = self._gen_config(options)
        past = check_history(history)
        refs, fresh = self._store_images(image)
        return past + [user_turn(text, refs)], fresh, cfg


class XComposerChatFormat(ChatFormat):
    """XComposer 1.0 (internlm-xcomposer-7b / -vl-7b): the turn dicts of its `chat()` (a user and a
    bot entry per turn), `<ImageHere>` where each image sat, images encoded once per prompt. Its
    template has no system turn. The oldest exchanges are left out whole."""

    family = "xcomposer"
    takes_images = True
    history_entries_per_turn = 2

    @property
    def context_window(self) -> int:
        return self.model.llm.context_window

    def generation_config(self, options=None, *, completion: bool = False) -> GenerationConfig:
        """Upstream's defaults (5 beams, repetition penalty 1.5, ...), stopping on `</s>` and `<eoa>`;
        with one beam on `<eoh>` too (`chat()` cuts its answer there, so the text is the same and the
        tokens after it are not generated; beam search keeps upstream's stops, whose scores they
        change). Completions as `complete()`."""
        options = dict(options or {})
        cfg = self.model._completion_config(options) if completion else self.model._gen_config(options)
        if cfg.num_beams > 1:
            return cfg
        return cfg.replace(eos_token_id=list(dict.fromkeys(cfg.stop_ids + [self.tokenizer.eoh_token_id])))

    def check_history(self, history) -> list:
        return check_history(history)

    def _turns(self, text: str, images, history):
        try:
            turns, fresh, _ = self.model._prepare(text, list(images) or None, history, {})
        except ValueError as e:
            raise ChatFormatError(str(e), "messages") from e
        return turns, fresh

    def _planned(self, turns, fresh, cfg: GenerationConfig, budget, keep_first, history=None) -> ChatPrompt:
        model = self.model
        segs, refs, dropped, n = model.plan_prompt(turns, cfg.max_new_tokens, self.window(budget), keep_first)
        return ChatPrompt(build=lambda: model.embed_segments(segs, refs, fresh), length=n, dropped=dropped,
                          history=history)

    def _prompt(self, messages, system, cfg, budget, keep_first, **request) -> ChatPrompt:
        history: list[dict[str, Any]] = []
        for k in range(0, len(messages) - 1, 2):
            user, bot = messages[k], messages[k + 1]
            history += [{"role": "user", "text": user.layout or user.text, "images": list(user.images)},
                        bot_turn(bot.text)]
        last = messages[-1]
        turns, fresh = self._turns(last.layout if last.layout is not None else last.text, last.images, history)
        return self._planned(turns, fresh, cfg, budget, keep_first)

    def turn(self, query, images, history, cfg, *, budget=None, keep_first=False) -> ChatPrompt:
        turns, fresh = self._turns(query, images, history)
        return self._planned(turns, fresh, cfg, budget, keep_first, history=lambda reply: turns + [bot_turn(reply)])

    def _stream_text(self, made: ChatPrompt, cfg: GenerationConfig) -> Iterator[str]:
        with torch.inference_mode():
            embeds = made.build()
        return self.model._stream_text(embeds, cfg)

    def completion_prompt(self, text: str, cfg: GenerationConfig) -> ChatPrompt:
        if IMAGE_PLACEHOLDER in text:
            raise ChatFormatError(f"/v1/completions takes text only; send images through /v1/chat/completions "
                                  f"(the prompt contains {IMAGE_PLACEHOLDER})", "prompt")
        model = self.model
        return ChatPrompt(build=lambda: model.raw_prompt(text, None, 0))


def _bicubic():
    from PIL import Image
    return Image.Resampling.BICUBIC


_unnormalize = unnormalize


__all__ = ["XComposer", "XComposerChatFormat", "XComposerConfig", "ChatStream", "GEN_DEFAULTS", "VARIANTS", "XCOMPOSER_META_INSTRUCTION",
           "checkpoint_key_map", "is_xcomposer_config", "variant_of", "xcomposer_7b_config", "IMAGE_SIZE"]
