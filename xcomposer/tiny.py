"""Tiny checkpoints in the exact upstream layouts, for tests, examples and demo mode.

The model is random (its output is noise) but everything else is real: the config.json field
names, sharded `.bin` or `.safetensors` with their index, a trained sentencepiece
`tokenizer.model` with InternLM's special pieces, and the derivable `rotary_emb.inv_freq`
buffers that real shards carry.

`write_tiny_clip` writes a tiny random open_clip model the same way, so image libraries can be built
and searched offline: its retrieval is noise, but config loading, weight loading, preprocessing and
encoding are open_clip's real code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .llm.checkpoint import save_checkpoint
from .llm.config import InternLM2Config, InternLMConfig
from .llm.decoder import InternLMForCausalLM
from .llm.tokenizer import load_tokenizer, train_tiny_tokenizer

TINY_SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512)


def tiny_internlm_config(vocab_size: int, **overrides) -> InternLMConfig:
    return InternLMConfig(**{**TINY_SHAPE, "vocab_size": vocab_size, "torch_dtype": "float32", **overrides})


def upstream_config_dict(cfg: InternLMConfig) -> dict:
    """config.json as the internlm-chat-7b repository writes it (remote-code fields included)."""
    d = cfg.to_dict()
    d.setdefault("auto_map", {
        "AutoConfig": "configuration_internlm.InternLMConfig",
        "AutoModel": "modeling_internlm.InternLMForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM",
    })
    d.setdefault("initializer_range", 0.02)
    d.setdefault("use_cache", True)
    d.setdefault("transformers_version", "4.33.2")
    return d


# Stand-ins for the remote-code files the hub repositories ship: only the definitions that tell the
# revisions apart (docs/checkpoint-format.md), so the loaders' reading of them is tested. Never run.
_REMOTE_CODE = {
    ("modeling_internlm.py", "2023-07"): (
        "# stand-in for internlm-chat-7b's modeling_internlm.py of July 2023 (tests only)\n"
        "class InternLMForCausalLM:\n"
        "    def build_inputs(self, tokenizer, query, history=[]):\n"
        "        prompt = ''.join(f'<|User|>:{q}<eoh>\\n<|Bot|>:{a}<eoa>\\n' for q, a in history)\n"
        "        return tokenizer([prompt + f'<|User|>:{query}<eoh>\\n<|Bot|>:'], return_tensors='pt')\n"),
    ("modeling_internlm.py", "2023-12"): (
        "# stand-in for internlm-chat-7b's modeling_internlm.py of December 2023 (tests only)\n"
        "class InternLMForCausalLM:\n"
        "    def build_inputs(self, tokenizer, query, history=[], meta_instruction=''):\n"
        "        prompt = f'<|System|>:{meta_instruction}\\n' if meta_instruction else ''\n"
        "        prompt += ''.join(f'<|User|>:{q}\\n<|Bot|>:{a}<eoa>\\n' for q, a in history)\n"
        "        return tokenizer([prompt + f'<|User|>:{query}\\n<|Bot|>:'], return_tensors='pt')\n"),
    ("modeling_InternLM_XComposer.py", "7b"): (
        "# stand-in for internlm-xcomposer-7b's modeling_InternLM_XComposer.py (tests only)\n"
        "class InternLMXComposerForCausalLM:\n"
        "    meta_instruction = 'meta instruction\\nYou are an AI assistant whose name is 浦语.\\nconversation\\n'\n"
        "    gen_config = dict(num_beams=5, do_sample=False, max_new_tokens=500)\n"),
    ("modeling_InternLM_XComposer.py", "vl-7b"): (
        "# stand-in for internlm-xcomposer-vl-7b's modeling_InternLM_XComposer.py (tests only)\n"
        "class InternLMXComposerForCausalLM:\n"
        "    gen_config = dict(num_beams=5, do_sample=False, max_new_tokens=200)\n"),
}


def write_remote_code(folder: str | Path, filename: str, revision: str) -> Path:
    """Write the stand-in `filename` ("modeling_internlm.py" for "2023-07"/"2023-12",
    "modeling_InternLM_XComposer.py" for "7b"/"vl-7b") into `folder`."""
    path = Path(folder) / filename
    path.write_text(_REMOTE_CODE[(filename, revision)], encoding="utf-8")
    return path


def write_tiny_internlm(folder: str | Path, *, fmt: str = "safetensors", max_shard_bytes: int = 200_000,
                        seed: int = 0, std: float = 0.2, vocab_size: int = 1000, revision: str | None = None,
                        **overrides) -> Path:
    """Write a random tiny InternLM chat checkpoint to `folder` and return the folder; `revision`
    ("2023-07" / "2023-12") adds that revision's stand-in `modeling_internlm.py`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_tiny_tokenizer(folder / "tokenizer.model", vocab_size=vocab_size)
    tok = load_tokenizer(folder)
    cfg = tiny_internlm_config(tok.vocab_size, **overrides)
    model = InternLMForCausalLM(cfg)
    model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    state = dict(model.state_dict())
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    for i in range(cfg.num_hidden_layers):  # real shards carry this derivable buffer; loaders must skip it
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    save_checkpoint(state, folder, fmt=fmt, max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(upstream_config_dict(cfg), indent=2), encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id},
        indent=2), encoding="utf-8")
    if revision is not None:
        write_remote_code(folder, "modeling_internlm.py", revision)
    return folder


# -- InternLM2 / InternLM2.5 -----------------------------------------------------------------

# grouped-query attention at tiny size: 8 query heads share 2 kv heads (groups of 4, as in the 7B)
TINY2_SHAPE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, max_position_embeddings=512, rope_theta=1000000.0,
                   rope_scaling={"type": "dynamic", "factor": 2.0})

# internlm2_5-7b-chat's tokenizer_config.json names these pieces of its tokenizer.model
# ([UNUSED_TOKEN_141] .. [UNUSED_TOKEN_146] at ids 92538 .. 92543); the tiny model holds the same
# pieces at other ids, and loading finds them by name, never by id
INTERNLM2_CHAT_TOKENS = {"[UNUSED_TOKEN_141]": "<|plugin|>", "[UNUSED_TOKEN_142]": "<|interpreter|>",
                         "[UNUSED_TOKEN_143]": "<|action_end|>", "[UNUSED_TOKEN_144]": "<|action_start|>",
                         "[UNUSED_TOKEN_145]": "<|im_end|>", "[UNUSED_TOKEN_146]": "<|im_start|>"}


def tiny_internlm2_config(vocab_size: int, **overrides) -> InternLM2Config:
    return InternLM2Config(**{**TINY2_SHAPE, "vocab_size": vocab_size, "torch_dtype": "float32",
                              "eos_token_id": 2, "pad_token_id": 2, **overrides})


def upstream_internlm2_config_dict(cfg: InternLM2Config) -> dict:
    """config.json as the internlm2_5-7b-chat repository writes it (remote-code fields included)."""
    d = cfg.to_dict()
    d.setdefault("auto_map", {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
    })
    for k, v in (("attn_implementation", "eager"), ("initializer_range", 0.02), ("pretraining_tp", 1),
                 ("use_cache", True), ("transformers_version", "4.41.0")):
        d.setdefault(k, v)
    return d


def write_internlm2_tokenizer(folder: str | Path, vocab_size: int = 1000) -> Path:
    """A tiny real tokenizer.model shaped like InternLM2's (no dummy prefix, the chat slots as
    `[UNUSED_TOKEN_14x]` pieces) plus the tokenizer_config.json that names them."""
    folder = Path(folder)
    train_tiny_tokenizer(folder / "tokenizer.model", vocab_size=vocab_size, chat_pieces=list(INTERNLM2_CHAT_TOKENS),
                         add_dummy_prefix=False)
    plain = load_tokenizer(folder / "tokenizer.model")  # the bare model file: pieces under their own names
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    added = {str(i): {"content": plain.id_to_token(i), **entry} for i in (0, 1, 2)}
    for piece, name in INTERNLM2_CHAT_TOKENS.items():
        added[str(plain.token_to_id(piece))] = {"content": name, **entry}
    config = {
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                      "<|interpreter|>", "<|plugin|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "decode_with_prefix_space": False,
        "eos_token": "</s>", "pad_token": "</s>", "tokenizer_class": "InternLM2Tokenizer", "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return folder


def write_tiny_internlm2(folder: str | Path, *, fmt: str = "safetensors", max_shard_bytes: int = 200_000,
                         seed: int = 0, std: float = 0.2, vocab_size: int = 1000, **overrides) -> Path:
    """Write a random tiny InternLM2 chat checkpoint (upstream config.json names, packed `wqkv`,
    sharded weights with index, tokenizer.model + tokenizer_config.json) and return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_internlm2_tokenizer(folder, vocab_size)
    tok = load_tokenizer(folder)
    cfg = tiny_internlm2_config(tok.vocab_size, **overrides)
    model = InternLMForCausalLM(cfg)
    model.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    save_checkpoint(dict(model.state_dict()), folder, fmt=fmt, max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(upstream_internlm2_config_dict(cfg), indent=2), encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, tok.chat_token_id("<|im_end|>")], "pad_token_id": 2}, indent=2),
        encoding="utf-8")
    return folder


# -- XComposer -------------------------------------------------------------------------------

TINY_VISION = dict(img_size=28, patch_size=14, width=32, depth=2, heads=4)
TINY_QFORMER = dict(num_query_token=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=64)
_LORA_TARGETS = {"q": ["self_attn.q_proj"], "k": ["self_attn.k_proj"], "v": ["self_attn.v_proj"],
                 "o": ["self_attn.o_proj"], "ffn": ["mlp.up_proj", "mlp.down_proj"]}


def tiny_xcomposer_config_dict(vocab_size: int, *, learn_param=("q", "v"), lora_r: int = 4,
                               lora_alpha: float = 8.0, **overrides) -> dict:
    """config.json as upstream's internlm-xcomposer-7b writes it, at tiny sizes.

    `vision_config` / `qformer_config` are our extension (upstream's shapes are fixed in code)."""
    llm = {**TINY_SHAPE, "vocab_size": vocab_size, **{k: v for k, v in overrides.items()
                                                      if k not in ("vision_config", "qformer_config")}}
    d = {
        "architectures": ["InternLMXComposerForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_InternLM_XComposer.InternLMXComposerConfig",
                     "AutoModel": "modeling_InternLM_XComposer.InternLMXComposerForCausalLM"},
        "model_type": "InternLMXComposer",
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "bias": True,
        "num_query_token": TINY_QFORMER["num_query_token"],
        "num_quant": 32,
        "intern_converted_llm": True,
        "kqvo_bias": True,
        "device": "cuda",
        "internlm_lora": None if not learn_param else {
            "freeze": False, "learn_param": list(learn_param), "lora_alpha": lora_alpha, "lora_dropout": 0.05,
            "lora_r": lora_r},
        "torch_dtype": "float32",
        "transformers_version": "4.33.1",
        **llm,
        "vision_config": {**TINY_VISION, **overrides.get("vision_config", {})},
        "qformer_config": {k: v for k, v in {**TINY_QFORMER, **overrides.get("qformer_config", {})}.items()
                           if k != "num_query_token"},
    }
    return d


def upstream_xcomposer_state_dict(model, lora: dict | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`model`'s weights under upstream's key names, with LoRA adapters split off the LLM weights
    (base = merged - scale * B @ A) so that loading and merging gives `model` back."""
    from projector.sampler import sampler_to_checkpoint
    from vision.eva import vision_to_checkpoint

    sd: dict[str, torch.Tensor] = {}
    for k, v in model.vision.state_dict().items():
        sd[vision_to_checkpoint(k)] = v.clone()
    for k, v in model.sampler.state_dict().items():
        sd[sampler_to_checkpoint(k)] = v.clone()
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(512).expand(1, -1).clone()
    cfg = model.config.llm
    targets = [t for p in (lora or {}).get("learn_param", []) for t in _LORA_TARGETS[p]]
    scale = (lora["lora_alpha"] / lora["lora_r"]) if lora else 0.0
    for k, v in model.llm.state_dict().items():
        key = "internlm_model." + k
        stem = key[: -len(".weight")] if key.endswith(".weight") else None
        if stem is not None and any(stem.endswith(t) for t in targets):
            w = v.float()
            a = torch.randn(lora["lora_r"], w.shape[1], generator=generator) * 0.1
            b = torch.randn(w.shape[0], lora["lora_r"], generator=generator) * 0.1
            sd[key] = (w - scale * (b @ a)).to(v.dtype)
            sd[stem + ".lora_A.weight"] = a
            sd[stem + ".lora_B.weight"] = b
        else:
            sd[key] = v.clone()
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    for i in range(cfg.num_hidden_layers):
        sd[f"internlm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    return sd


def build_tiny_xcomposer(config_dict: dict, seed: int = 0, std: float = 0.2):
    """A randomly initialised XComposer for `config_dict` (no tokenizer attached)."""
    from projector.sampler import init_sampler_weights
    from vision.eva import init_vision_weights

    from .models.xcomposer import XComposer, XComposerConfig

    model = XComposer(XComposerConfig.from_dict(config_dict)).eval()
    g = torch.Generator().manual_seed(seed)
    model.llm.init_weights(std=std, generator=g)
    init_vision_weights(model.vision, generator=g)
    init_sampler_weights(model.sampler, generator=g)
    model.finish_loading("cpu")
    return model


def write_tiny_xcomposer(folder: str | Path, *, fmt: str = "safetensors", max_shard_bytes: int = 200_000,
                         seed: int = 0, std: float = 0.2, vocab_size: int = 1000, learn_param=("q", "v"),
                         lora_r: int = 4, lora_alpha: float = 8.0, variant: str | None = None,
                         **overrides) -> Path:
    """Write a random tiny internlm-xcomposer checkpoint (upstream key names, LoRA adapters,
    config.json fields, sharded weights with index, tokenizer with `<TOKENS_UNUSED_0/1>` as
    eoh/eoa and the `<ImageHere>` piece) to `folder`, and return the folder; `variant` ("7b" /
    "vl-7b") adds that repository's stand-in `modeling_InternLM_XComposer.py`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_tiny_tokenizer(folder / "tokenizer.model", vocab_size=vocab_size, extra_pieces=["<ImageHere>"],
                         xcomposer_names=True)
    tok = load_tokenizer(folder)
    d = tiny_xcomposer_config_dict(tok.vocab_size, learn_param=learn_param, lora_r=lora_r, lora_alpha=lora_alpha,
                                   **overrides)
    model = build_tiny_xcomposer(d, seed=seed, std=std)
    sd = upstream_xcomposer_state_dict(model, d["internlm_lora"], torch.Generator().manual_seed(seed + 1))
    save_checkpoint(sd, folder, fmt=fmt, max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(d, indent=2), encoding="utf-8")
    if variant is not None:
        write_remote_code(folder, "modeling_InternLM_XComposer.py", variant)
    return folder


# -- a tiny open_clip model for image libraries --------------------------------------------------
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


# -- XComposer2 ------------------------------------------------------------------------------

TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def write_xcomposer2_tokenizer(folder: str | Path, vocab_size: int = 1000) -> Path:
    """A tiny real tokenizer.model with XComposer2's chat pieces `[UNUSED_TOKEN_141..146]` (used
    under those names in its prompts) and `[UNUSED_TOKEN_0]` (its composition demo's stop word), and a
    tokenizer_config.json naming only `<unk>`/`<s>`/`</s>`."""
    folder = Path(folder)
    train_tiny_tokenizer(folder / "tokenizer.model", vocab_size=vocab_size,
                         chat_pieces=["[UNUSED_TOKEN_0]", *INTERNLM2_CHAT_TOKENS], add_dummy_prefix=False)
    plain = load_tokenizer(folder / "tokenizer.model")
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    config = {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": plain.id_to_token(i), **entry} for i in (0, 1, 2)},
        "auto_map": {"AutoTokenizer": ["tokenization_internlm_xcomposer2.InternLMXComposer2Tokenizer", None]},
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "</s>", "pad_token": "</s>",
        "tokenizer_class": "InternLMXComposer2Tokenizer", "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def _random_fill(model, seed: int, std: float):
    """Seeded random weights: norms near 1, everything else normal(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _xcomposer2_config_dict(tok, max_length: int, **overrides) -> dict:
    """config.json of a tiny XComposer2 / 2.5: InternLM2 fields, upstream's architectures and auto_map."""
    d = upstream_internlm2_config_dict(tiny_internlm2_config(tok.vocab_size, **overrides))
    d.update({"architectures": ["InternLMXComposer2ForCausalLM"], "model_type": "internlmxcomposer2",
              "auto_map": {"AutoConfig": "configuration_internlm_xcomposer2.InternLMXcomposer2Config",
                           "AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM",
                           "AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"},
              "max_length": max_length, "vision_config": dict(TINY_CLIP)})
    return d


def write_tiny_xcomposer2(folder: str | Path, *, fmt: str = "safetensors", max_shard_bytes: int = 200_000,
                          seed: int = 0, std: float = 0.2, vocab_size: int = 1000, img_size: int = 28,
                          plora_rank: int = 8, max_length: int = 512, model_type: str = "internlmxcomposer2",
                          **overrides) -> Path:
    """Write a random tiny InternLM-XComposer2 checkpoint in upstream's layout (config.json with
    `architectures` ["InternLMXComposer2ForCausalLM"], `img_size`, `max_length`; keys `model.*` with
    Plora_A/Plora_B, `output`, `vit.vision_tower.vision_model.*`, `vision_proj.*`, sharded with an
    index) plus its tokenizer, and return the folder. `vision_config` and `plora_rank` in config.json
    are our extension for tiny shapes (upstream's are fixed in its code)."""
    from .models.xcomposer2 import XComposer2, XComposer2Config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_xcomposer2_tokenizer(folder, vocab_size)
    tok = load_tokenizer(folder)
    d = _xcomposer2_config_dict(tok, max_length, **overrides)
    d.update({"model_type": model_type, "img_size": img_size, "plora_rank": plora_rank})
    model = _random_fill(XComposer2(XComposer2Config.from_dict(d)), seed, std)
    save_checkpoint(dict(model.state_dict()), folder, fmt=fmt, max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(d, indent=2), encoding="utf-8")
    return folder


# -- XComposer2.5 ----------------------------------------------------------------------------

TINY_TASK_LORAS = {"web": 8, "sft": 8, "dpo": 4}


def write_tiny_xcomposer2d5(folder: str | Path, *, fmt: str = "safetensors", max_shard_bytes: int = 400_000,
                            seed: int = 0, std: float = 0.2, vocab_size: int = 1000, plora_rank: int = 8,
                            task_loras: dict[str, int] | None = None, max_length: int = 16384,
                            **overrides) -> Path:
    """Write a random tiny InternLM-XComposer2.5 checkpoint in upstream's layout: config.json as
    XComposer2's (`architectures` ["InternLMXComposer2ForCausalLM"], `max_length`), keys `model.*`
    with `Plora_A/B` and the task LoRAs `lora_{web,sft,dpo}_{A,B}` on every projection, `output`,
    `plora_glb_GN`, `plora_sub_GN`, `vit.vision_tower.vision_model.*` (CLIP at 560 px: the real
    crop geometry, 40 x 40 patches), `vision_proj.*` (4 x CLIP width in), sharded with an index, plus
    its tokenizer. The LoRA ranks are read back from the weights' shapes, as for the real checkpoint;
    `vision_config` is our extension for a tiny CLIP."""
    from .models.xcomposer2d5 import XComposer2d5, XComposer2d5Config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_xcomposer2_tokenizer(folder, vocab_size)
    tok = load_tokenizer(folder)
    d = _xcomposer2_config_dict(tok, max_length, **overrides)
    ranks = dict(TINY_TASK_LORAS if task_loras is None else task_loras)
    model = XComposer2d5(XComposer2d5Config.from_dict({**d, "plora_rank": plora_rank, "task_lora_ranks": ranks}))
    _random_fill(model, seed, std)
    save_checkpoint(dict(model.state_dict()), folder, fmt=fmt, max_shard_bytes=max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(d, indent=2), encoding="utf-8")
    return folder
