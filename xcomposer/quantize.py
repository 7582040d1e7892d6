"""`python -m xcomposer quantize`: write a GPTQ checkpoint of a 16-bit InternLM / InternLM2 / XComposer2 / 2.5 folder.

    from xcomposer.quantize import quantize_checkpoint
    report = quantize_checkpoint("my-finetuned-internlm2", "my-finetuned-internlm2-4bit", bits=4, group_size=128)

The GPTQ algorithm is gptqmodel's (`gptqmodel.quantization.gptq.GPTQ`: the Hessian of each linear's
inputs, act-order / group-aware ordering, the column-by-column error feedback) and so is the packer
(`TorchLinear.pack_original`, its v2 -> v1 zero-point conversion). What is ours is the sequential
loop around it, on our own decoder: the calibration prompts run through layer i, forward hooks feed
each projection's inputs to its `GPTQ` task, the projections are quantized a subset at a time (q/k/v,
then o, then gate/up, then down: auto_gptq's `true_sequential`), and the quantized layer's outputs
are the inputs of layer i + 1. gptqmodel's own model loop (`GPTQModel.load(...).quantize(...)`)
is not used: it builds the model from the checkpoint's transformers remote code.

The folder written is the published layout (auto_gptq / gptqmodel "gptq" v1; docs/quantization-formats.md,
"Quantizing your own checkpoint"): per quantized linear `qweight`, `qzeros`, `scales` (fp16), `g_idx`
(and an fp16 `bias` where the linear has one) under the checkpoint's own keys (InternLM2's `wqkv` is
one quantized matrix in upstream's kv-group row layout; XComposer2's stems end in `.linear`, beside
the 16-bit `Plora_A` / `Plora_B`), config.json's `quantization_config` plus `quantize_config.json`.
Every other tensor is copied from the source shards as it is stored, and so is every non-weight file.

XComposer2.5 (internlm-xcomposer2d5-7b: an XComposer2 architecture name whose weights hold
`plora_glb_GN`) loads through `XComposer.from_pretrained` (class `XComposer2d5`) and is quantized as
XComposer2 is: the same `.linear` stems, Partial LoRA, the task LoRAs (`lora_web` / `lora_sft` /
`lora_dpo`), `plora_glb_GN` / `plora_sub_GN` and the vision weights copied in 16-bit. Calibration runs
the base decoder (no task LoRA: chat's "base" mode) on text. XComposer2-4KHD is refused (not loadable
here).

gptqmodel is installed without its dependencies (requirements-quantize.txt, `INSTALL` below): its
full dependency list wants pillow>=13, which gradio 6 (a core dependency here) refuses.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .llm.checkpoint import iter_shards
from .llm.derived import check_output_folder, write_derived_folder

INSTALL = "pip install --no-deps -r requirements-quantize.txt"
GPTQMODEL_VERSION = "7.7.0"
BITS = (4, 8)
DEFAULT_GROUP_SIZE = 128  # auto_gptq's and gptqmodel's default, and upstream's 4-bit exports'
DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
# files that hold weights (never copied: the quantized shards replace them, and a stale 16-bit index
# beside the new shards would shadow them in any loader)
_SKIPPED_FILES = ("quantize_config.json", "quant_config.json")


class QuantizeError(ValueError):
    """A quantize request that cannot be carried out; the message names the input and the fix."""


def builtin_calibration() -> Path:
    """The calibration set shipped with the package (xcomposer/data/calibration.jsonl): 41 records
    of English and Chinese prose, code, instructions and chats written for this project."""
    return Path(__file__).with_name("data") / "calibration.jsonl"


# -- calibration data --------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationRecord:
    """One calibration sample: plain `text`, or a chat as `messages` ({"role", "content"} dicts)."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    where: str = ""  # "FILE line N" / "FILE paragraph N", for messages


def read_calibration(path: str | os.PathLike) -> list[CalibrationRecord]:
    """Records of a calibration file: JSONL (`.jsonl`: one {"text": ...} or {"messages": [{"role",
    "content"}, ...]} object per line, blank lines skipped) or plain text (any other name: paragraphs
    separated by blank lines)."""
    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"calibration file not found: {path}; pass a text file or a JSONL file of "
                            f'{{"text": ...}} / {{"messages": [...]}} records, or leave --calib out to use the built-in set')
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QuantizeError(f"cannot read calibration file {path} as UTF-8 text ({e})") from e
    records: list[CalibrationRecord] = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                records.append(_jsonl_record(line, f"{path} line {n}"))
    else:
        paragraphs = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
        records = [CalibrationRecord(text=p, where=f"{path} paragraph {i}")
                   for i, p in enumerate((p for p in paragraphs if p), 1)]
    if not records:
        raise QuantizeError(f"calibration file {path} holds no text: give at least one paragraph (text file) or one "
                            f'{{"text": ...}} line (JSONL)')
    return records


def _jsonl_record(line: str, where: str) -> CalibrationRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise QuantizeError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one object "
                            f'such as {{"text": "..."}} or {{"messages": [{{"role": "user", "content": "..."}}]}}') from e
    if not isinstance(obj, dict) or ("text" in obj) == ("messages" in obj):
        raise QuantizeError(f'{where}: expected an object with exactly one of "text" or "messages", got '
                            f"{json.dumps(obj, ensure_ascii=False)[:80]}")
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise QuantizeError(f'{where}: "text" must be a non-empty string')
        return CalibrationRecord(text=obj["text"], where=where)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise QuantizeError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise QuantizeError(f'{where}: messages[{i}] must be {{"role": "system" | "user" | "assistant", '
                                f'"content": "..."}}, got {json.dumps(m, ensure_ascii=False)[:80]}')
        out.append((m["role"], m["content"]))
    roles = [r for r, _ in out]
    body = roles[1:] if roles[0] == "system" else roles
    if not body or any(r != ("user" if k % 2 == 0 else "assistant") for k, r in enumerate(body)):
        raise QuantizeError(f"{where}: messages must be an optional system message, then user and assistant turns "
                            f"alternating from a user turn; got roles {roles}")
    return CalibrationRecord(messages=tuple(out), where=where)


def chat_text(record: CalibrationRecord, family: str, tokenizer, template: str = "2023-12") -> str:
    """The text (without `<s>`) a chat record is in the checkpoint's own chat format: InternLM2 /
    XComposer2 / 2.5 chatml (`xcomposer.llm.chat.format_chatml_prompt`; the model's default system
    text when the chat has none: none for 2.5, whose chat adds it only with use_meta=True) or internlm-chat-7b's template (`format_prompt`), each finished
    assistant turn closed as the model closes it (`<|im_end|>` / `<eoa>`)."""
    from .llm import chat

    msgs = list(record.messages or ())
    system = msgs.pop(0)[1] if msgs and msgs[0][0] == "system" else None
    pairs = [(msgs[k][1], msgs[k + 1][1] if k + 1 < len(msgs) else None) for k in range(0, len(msgs), 2)]
    *history, (query, reply) = pairs
    if family == "internlm":
        text = chat.format_prompt(tokenizer, query, history, template, system)
        return text if reply is None else text + f"{reply}{tokenizer.eoa}\n"
    if system is None:
        if family == "xcomposer2":
            from .models.xcomposer2 import XCOMPOSER2_META_INSTRUCTION as system
        elif family == "xcomposer2d5":
            system = ""  # XComposer2d5.chat: no system turn unless use_meta=True
        else:
            system = chat.INTERNLM2_META_INSTRUCTION
    text = chat.format_chatml_prompt(query, history, system)
    return text if reply is None else text + f"{reply}{chat.IM_END}\n"


def calibration_ids(records: Sequence[CalibrationRecord], tokenizer, family: str, *, samples: int, seq_len: int,
                    template: str = "2023-12") -> list[list[int]]:
    """Token ids of the first `samples` records, each with `<s>` and cut to `seq_len` tokens."""
    out = []
    for r in records[:samples]:
        text = r.text if r.text is not None else chat_text(r, family, tokenizer, template)
        ids = tokenizer.encode(text, add_bos=True)[:seq_len]
        if len(ids) >= 2:
            out.append(ids)
    if not out:
        raise QuantizeError("the calibration records give no sample of 2 or more tokens: use longer texts")
    return out


# -- the request -------------------------------------------------------------------------------

@dataclass
class QuantizeReport:
    """What `quantize_checkpoint` wrote and how it went."""

    out: Path
    family: str  # "internlm" | "internlm2" | "xcomposer2" | "xcomposer2d5"
    quantization_config: dict
    samples: int
    tokens: int
    seconds: float
    linears: int
    losses: dict[str, float] = field(default_factory=dict)  # checkpoint stem -> gptqmodel's average loss


def _check_options(method: str, bits: Any, group_size: Any, samples: Any, seq_len: Any, damp_percent: Any) -> None:
    if method == "awq":
        raise QuantizeError(
            "AWQ export is not available: gptqmodel 7.7's AWQ search (AWQProcessor) runs only inside its own model "
            "loop, which needs its model definitions (the scaling groups of awq_get_modules_for_scaling), so it cannot "
            "be driven on this decoder's layers. GPTQ export is: use --method gptq (the published AWQ folders, e.g. "
            "internlm2_5-7b-chat-4bit, still load as they are)")
    if method != "gptq":
        raise QuantizeError(f"unknown method {method!r}: use 'gptq'")
    if isinstance(bits, bool) or bits not in BITS:
        raise QuantizeError(f"bits={bits!r} is not supported: the GPTQ layout written here (and read by this loader, "
                            f"vLLM and LMDeploy) is 4-bit or 8-bit; use --bits 4 or --bits 8")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise QuantizeError(f"group_size={group_size!r} must be a positive number of inputs per group, or -1 for one "
                            f"group over all inputs (default {DEFAULT_GROUP_SIZE})")
    for name, v in (("calib_samples", samples), ("calib_seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise QuantizeError(f"{name}={v!r} must be a positive integer")
    if seq_len < 2:
        raise QuantizeError(f"calib_seq_len={seq_len} must be at least 2 tokens")
    if damp_percent is not None and not (isinstance(damp_percent, (int, float)) and 0 < damp_percent < 1):
        raise QuantizeError(f"damp_percent={damp_percent!r} must lie strictly between 0 and 1")


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise QuantizeError(f"checkpoint folder not found: {folder}; pass the local folder of the 16-bit checkpoint "
                            f"(config.json, weight shards, tokenizer.model)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise QuantizeError(f"{folder} has no config.json: pass the folder of an InternLM / InternLM2 / XComposer2 / "
                            f"XComposer2.5 checkpoint")
    try:
        d = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise QuantizeError(f"{cfg_file} cannot be read as JSON ({e})") from e
    if not isinstance(d, dict):
        raise QuantizeError(f"{cfg_file} is not a JSON object")
    return d


def _family(folder: Path, d: dict) -> str:
    from .models.xcomposer import is_xcomposer_config
    from .models.xcomposer2 import is_xcomposer2_config
    from .llm.packed_quant import read_packed_quantization

    spec = read_packed_quantization(folder)
    if spec is not None or isinstance(d.get("quantization_config"), dict):
        what = spec.describe() if spec is not None else \
            f"quantization_config {json.dumps(d['quantization_config'])[:80]}"
        raise QuantizeError(f"{folder} is quantized already ({what}): quantize the 16-bit checkpoint it was made from")
    if is_xcomposer2_config(d):
        return _xcomposer2_family(folder)
    if is_xcomposer_config(d):
        raise QuantizeError(f"{folder} is an InternLM-XComposer 1.0 checkpoint, which quantize does not handle: it "
                            f"quantizes InternLM (v1), InternLM2 / 2.5 and InternLM-XComposer2 / 2.5 checkpoints")
    from .llm.config import config_from_dict
    try:
        return config_from_dict(d).family
    except (TypeError, ValueError) as e:
        raise QuantizeError(f"{folder / 'config.json'} does not describe an InternLM model ({e})") from e


def _xcomposer2_family(folder: Path) -> str:
    """"xcomposer2" or "xcomposer2d5" for an InternLMXComposer2ForCausalLM folder (one architecture
    name, three generations: `checkpoint_generation` reads the weights' names)."""
    from .llm.checkpoint import CheckpointError
    from .models.xcomposer2 import checkpoint_generation
    try:
        generation = checkpoint_generation(folder)
    except (CheckpointError, OSError, ValueError) as e:
        raise QuantizeError(f"cannot list the weights of {folder} ({e}): quantize tells XComposer2 from 2.5 by them")
    if generation == "4khd":
        raise QuantizeError(f"{folder} is InternLM-XComposer2-4KHD (336-px HD_transform tiling), which this project "
                            f"does not load, so quantize does not handle it either: it quantizes "
                            f"internlm-xcomposer2-vl-7b / -7b and internlm-xcomposer2d5-7b folders")
    return "xcomposer2d5" if generation == "2.5" else "xcomposer2"


def _decoder_config(d: dict, family: str):
    """The decoder's config from config.json (XComposer2 / 2.5: its InternLM2 fields, as the model's
    own loader reads them)."""
    if family in _XCOMPOSER2_FAMILIES:
        from .llm.checkpoint import CheckpointError
        from .models.xcomposer2 import XComposer2Config
        try:
            return XComposer2Config.from_dict(d).llm
        except (CheckpointError, TypeError, ValueError) as e:
            raise QuantizeError(f"config.json does not describe an InternLM-XComposer2 decoder ({e})") from e
    from .llm.config import config_from_dict
    return config_from_dict({k: v for k, v in d.items() if k not in ("vision_config", "plora_rank", "img_size",
                                                                      "max_length")})


_XCOMPOSER2_FAMILIES = ("xcomposer2", "xcomposer2d5")


def _check_shapes(llm_cfg, bits: int, group_size: int) -> None:
    """Every quantized linear's inputs split into whole groups and whole int32 words."""
    h, inter = llm_cfg.hidden_size, llm_cfg.intermediate_size
    qkv = (llm_cfg.num_attention_heads + 2 * llm_cfg.kv_heads) * llm_cfg.head_dim
    pf = 32 // bits
    for name, n in (("hidden_size (inputs of q/k/v/o, gate/up)", h), ("intermediate_size (inputs of down)", inter)):
        if group_size != -1 and n % group_size:
            divisors = [g for g in (32, 64, 128, 256) if g <= n and n % g == 0]
            raise QuantizeError(f"group_size={group_size} does not divide the model's {name} = {n}; GPTQ groups are "
                                f"whole runs of inputs: use a group size that divides {n}"
                                + (f" (e.g. {', '.join(map(str, divisors))})" if divisors else "") + " or -1")
        if n % pf:
            raise QuantizeError(f"the model's {name} = {n} does not fill whole int32 words at {bits} bits")
    for name, n in (("q/k/v outputs", qkv), ("hidden_size", h), ("intermediate_size", inter)):
        if n % pf:
            raise QuantizeError(f"{name} = {n} is not a multiple of {pf}: GPTQ packs {pf} zero points per int32 word")


def _gptqmodel():
    """gptqmodel's GPTQ task, its config, its CPU packer and its v2 -> v1 conversion."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its banner and notes are not our output
            from gptqmodel.nn_modules.qlinear.torch import TorchLinear
            from gptqmodel.quantization import QuantizeConfig
            from gptqmodel.quantization.gptq import GPTQ
            from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
            import gptqmodel
    except ImportError as e:
        raise QuantizeError(f"quantize needs gptqmodel {GPTQMODEL_VERSION}, which does not import here ({e}); install "
                            f"it without its dependencies (its full list pins pillow>=13, which gradio refuses): "
                            f"`{INSTALL}` from the repository root") from e
    return gptqmodel.__version__, GPTQ, QuantizeConfig, TorchLinear, convert_gptq_v2_to_v1_format_module


# -- the model side --------------------------------------------------------------------------------

@dataclass
class _Task:
    """One upstream linear: `stem` in the checkpoint, the decoder modules it covers (q/k/v for
    InternLM2's wqkv), and the module whose input is recorded."""

    stem: str
    modules: tuple[str, ...]
    hook: str


def _subsets(family: str) -> list[list[_Task]]:
    """A layer's linears in auto_gptq's `true_sequential` order, under the checkpoint's own stems."""
    if family == "internlm":
        names = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                 ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
        return [[_Task(n, (n,), n) for n in group] for group in names]
    return [[_Task("attention.wqkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.q_proj")],
            [_Task("attention.wo", ("self_attn.o_proj",), "self_attn.o_proj")],
            [_Task("feed_forward.w1", ("mlp.gate_proj",), "mlp.gate_proj"),
             _Task("feed_forward.w3", ("mlp.up_proj",), "mlp.up_proj")],
            [_Task("feed_forward.w2", ("mlp.down_proj",), "mlp.down_proj")]]


def _load_decoder(folder: Path, family: str, dtype: torch.dtype):
    """(our decoder on the CPU, unfused, in the checkpoint's dtype; its tokenizer; v1 chat template)."""
    if family == "xcomposer2":
        from .models.xcomposer2 import XComposer2
        model = XComposer2.from_pretrained(folder, device="cpu", dtype=dtype, fuse=False)
        return model.llm, model.tokenizer, "2023-12"
    if family == "xcomposer2d5":  # XComposer2.from_pretrained refuses 2.5: the loader of every generation
        from .models.xcomposer import XComposer
        from .models.xcomposer2d5 import XComposer2d5
        model = XComposer.from_pretrained(folder, device="cpu", dtype=dtype, fuse=False)
        if not isinstance(model, XComposer2d5):  # checkpoint_generation said 2.5: the two must agree
            raise QuantizeError(f"{folder} was read as XComposer2.5 but loaded as {type(model).__name__}")
        return model.llm, model.tokenizer, "2023-12"
    from .llm.internlm import InternLM
    model = InternLM.from_pretrained(folder, device="cpu", dtype=dtype, fuse=False)
    if model.tokenizer is None:
        raise QuantizeError(f"{folder} has no tokenizer.model: the calibration text is tokenized with the checkpoint's "
                            f"own tokenizer")
    return model, model.tokenizer, model.chat_template


class _Stop(Exception):
    pass


@torch.no_grad()
def _layer_inputs(llm, samples: list[list[int]], device: torch.device) -> tuple[list[torch.Tensor], list[tuple]]:
    """Each sample's hidden states entering layer 0 (fp32, on `device`) and the rest of the layer's
    arguments (rotary tables, mask), caught by running the model up to its first layer."""
    hidden, rest = [], []
    first = llm.model.layers[0]

    def catch(module, args, kwargs):
        hidden.append(args[0].to(device, torch.float32))
        rest.append(tuple(a.to(device, torch.float32) if torch.is_tensor(a) and a.is_floating_point()
                          else (a.to(device) if torch.is_tensor(a) else a) for a in args[1:]))
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    embed = llm.model.embed_tokens
    old = embed.weight.dtype
    embed.float()  # layer inputs and the rotary tables in fp32, whatever the checkpoint's dtype
    try:
        for ids in samples:
            try:
                llm(torch.tensor([ids]))
            except _Stop:
                pass
    finally:
        handle.remove()
        embed.to(old)
    return hidden, rest


def _fused_weight(llm, layer, task: _Task) -> tuple[torch.Tensor, torch.Tensor | None]:
    mods = [layer.get_submodule(m) for m in task.modules]
    if len(mods) == 1:
        return mods[0].weight.detach(), (None if mods[0].bias is None else mods[0].bias.detach())
    from .llm.internlm2 import pack_wqkv
    w = pack_wqkv(*(m.weight.detach() for m in mods), llm.config)
    b = None if mods[0].bias is None else pack_wqkv(*(m.bias.detach() for m in mods), llm.config)
    return w, b


def _assign(llm, layer, task: _Task, q: torch.Tensor) -> None:
    """Put the quantized (dequantized) weight back into the decoder's module(s)."""
    mods = [layer.get_submodule(m) for m in task.modules]
    if len(mods) == 1:
        parts = (q,)
    else:
        from .llm.internlm2 import split_wqkv
        parts = split_wqkv(q, llm.config)
    for m, p in zip(mods, parts):
        m.weight.data.copy_(p.to(m.weight.device, m.weight.dtype))


def quantize_checkpoint(folder: str | os.PathLike, out: str | os.PathLike, *, method: str = "gptq", bits: int = 4,
                        group_size: int = DEFAULT_GROUP_SIZE, desc_act: bool = False, sym: bool = True,
                        calib: str | os.PathLike | None = None, calib_samples: int = DEFAULT_SAMPLES,
                        calib_seq_len: int = DEFAULT_SEQ_LEN, device: str | torch.device | None = None,
                        damp_percent: float | None = None, overwrite: bool = False,
                        max_shard_bytes: int = 2 * 2**30,
                        log: Callable[[str], None] | None = None) -> QuantizeReport:
    """Quantize the 16-bit checkpoint `folder` with GPTQ and write it to `out` (see the module doc).

    `bits` 4 or 8; `group_size` inputs per group (-1: one group); `desc_act` act-order (gptqmodel's
    group-aware reordering, which keeps the plain group layout, is used when it is off); `sym`
    symmetric zero points (written as v1 "gptq"; asymmetric ones as "gptq_v2", since v1 cannot store
    a zero point of 0); `calib` a text / JSONL file (default: the built-in set), of which the first
    `calib_samples` records are used, each cut to `calib_seq_len` tokens; `device` runs the layers
    and GPTQ (default cuda when available); `damp_percent` gptqmodel's Hessian dampening (default
    its own, 0.05). The folder is written under a temporary name next to `out` and renamed when
    complete; `overwrite` replaces an existing non-empty `out`.
    """
    t0 = time.perf_counter()
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    folder, out = Path(folder), Path(out)
    _check_options(method, bits, group_size, calib_samples, calib_seq_len, damp_percent)
    d = _read_config(folder)
    family = _family(folder, d)
    llm_cfg = _decoder_config(d, family)
    _check_shapes(llm_cfg, bits, group_size)
    check_output_folder(folder, out, overwrite, "quantized checkpoint")
    version, GPTQ, QuantizeConfig, TorchLinear, to_v1 = _gptqmodel()
    records = read_calibration(calib if calib is not None else builtin_calibration())
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    from .llm.internlm import check_device, resolve_dtype
    check_device(device)

    ckpt_dtype = resolve_dtype(None, torch.device("cuda"), llm_cfg.torch_dtype)  # the checkpoint's own dtype
    llm, tokenizer, template = _load_decoder(folder, family, ckpt_dtype)
    samples = calibration_ids(records, tokenizer, family, samples=calib_samples, seq_len=calib_seq_len,
                              template=template)
    tokens = sum(len(s) for s in samples)
    log(f"quantize: {folder.name} ({family}, {llm_cfg.num_hidden_layers} layers) -> GPTQ {bits}-bit, group "
        f"{group_size}, {'act-order' if desc_act else 'no act-order'}, {'sym' if sym else 'asym'}; "
        f"{len(samples)} calibration samples, {tokens} tokens; gptqmodel {version} on {device}")

    qkw = dict(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, offload_to_disk=False)
    if damp_percent is not None:
        qkw["damp_percent"] = float(damp_percent)
    if desc_act or group_size == -1:  # group-aware reordering needs groups and excludes act-order
        qkw["act_group_aware"] = False
    with contextlib.redirect_stdout(sys.stderr):
        qcfg = QuantizeConfig(**qkw)
    fmt = "gptq" if sym else "gptq_v2"
    packed: dict[str, dict[str, torch.Tensor]] = {}  # checkpoint stem (as written) -> its tensors
    losses: dict[str, float] = {}
    suffix = ".linear" if family in _XCOMPOSER2_FAMILIES else ""

    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        hidden, rest = _layer_inputs(llm, samples, device)
        for i, layer in enumerate(llm.model.layers):
            t_layer = time.perf_counter()
            layer.to(device, torch.float32)
            for subset in _subsets(family):
                tasks = {}
                for task in subset:
                    w, b = _fused_weight(llm, layer, task)
                    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=device, dtype=torch.float32)
                    lin.weight.copy_(w)
                    if b is not None:
                        lin.bias.copy_(b)
                    g = GPTQ(lin, qcfg)
                    g.quantizer.configure(perchannel=True)
                    g.expected_nsamples = tokens
                    tasks[task.stem] = (task, lin, g)
                hooks = []
                for task, _, g in tasks.values():
                    def record(module, inp, outp, g=g):
                        g.add_batch(inp[0].detach(), None)
                    hooks.append(layer.get_submodule(task.hook).register_forward_hook(record))
                try:
                    for x, r in zip(hidden, rest):
                        layer(x, *r)
                finally:
                    for h in hooks:
                        h.remove()
                for stem, (task, lin, g) in tasks.items():
                    q, scale, zero, g_idx, _, loss, _, _ = g.quantize()
                    g.free()
                    _assign(llm, layer, task, q)
                    key = f"model.layers.{i}.{stem}{suffix}"
                    packed[key] = _pack(TorchLinear, to_v1, qcfg, lin, q, scale, zero, g_idx, bits, group_size,
                                        desc_act, sym, fmt)
                    losses[key] = float(loss) if isinstance(loss, (int, float)) else float("nan")
            hidden = [layer(x, *r) for x, r in zip(hidden, rest)]
            layer.to_empty(device="meta")  # done: its weights are packed, the rest is copied from the shards
            worst = max(losses[f"model.layers.{i}.{t.stem}{suffix}"] for s in _subsets(family) for t in s)
            log(f"quantize: layer {i + 1}/{llm_cfg.num_hidden_layers} in {time.perf_counter() - t_layer:.1f} s "
                f"(largest GPTQ loss {worst:.3g})")
    del hidden, rest, llm

    qconf = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
             "checkpoint_format": fmt, "damp_percent": qcfg.damp_percent, "static_groups": False,
             "true_sequential": True, "pack_dtype": "int32",
             "meta": {"quantizer": ["xcomposer quantize", f"gptqmodel:{version}"],
                      "act_group_aware": bool(getattr(qcfg, "act_group_aware", False)),
                      "calibration": {"samples": len(samples), "tokens": tokens}}}
    write_derived_folder(folder, out, _output_state(folder, packed, family), config={**d, "quantization_config": qconf},
                         extra_files={"quantize_config.json": json.dumps(qconf, indent=2, ensure_ascii=False) + "\n"},
                         skip_files=_SKIPPED_FILES, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    seconds = time.perf_counter() - t0
    log(f"quantize: wrote {out} ({len(packed)} quantized linears, {seconds:.1f} s)")
    return QuantizeReport(out=out, family=family, quantization_config=qconf, samples=len(samples), tokens=tokens,
                          seconds=seconds, linears=len(packed), losses=losses)


def _pack(TorchLinear, to_v1, qcfg, lin: nn.Linear, q: torch.Tensor, scale, zero, g_idx, bits: int, group_size: int,
          desc_act: bool, sym: bool, fmt: str) -> dict[str, torch.Tensor]:
    """gptqmodel's CPU packer on the quantized weight: qweight, qzeros (v1 unless `fmt` is gptq_v2),
    fp16 scales, g_idx, fp16 bias."""
    src = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
    src.weight.data = q.detach().float().cpu()
    if lin.bias is not None:
        src.bias.data = lin.bias.detach().float().cpu()
    m = TorchLinear(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, in_features=lin.in_features,
                    out_features=lin.out_features, bias=lin.bias is not None, pack_dtype=torch.int32,
                    register_buffers=True)
    m.pack_original(src, scale.float().cpu(), zero.float().cpu(), g_idx=g_idx.to(torch.int32).cpu())
    if fmt == "gptq":
        to_v1(m, qcfg)
    out = {"qweight": m.qweight, "qzeros": m.qzeros, "scales": m.scales.to(torch.float16),
           "g_idx": m.g_idx.to(torch.int32)}
    if lin.bias is not None:
        out["bias"] = m.bias.to(torch.float16)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


# -- writing -------------------------------------------------------------------------------------

def _quantized_source_keys(packed: dict[str, dict], family: str) -> dict[str, str]:
    """Source key (`<stem>.weight` / `.bias`) -> the written stem that replaces it."""
    suffix = ".linear" if family in _XCOMPOSER2_FAMILIES else ""
    out = {}
    for written in packed:
        stem = written[: -len(suffix)] if suffix else written
        out[f"{stem}.weight"] = written
        out[f"{stem}.bias"] = written
    return out


def _output_state(folder: Path, packed: dict[str, dict], family: str) -> dict[str, torch.Tensor]:
    """The source shards' tensors in their order, each quantized weight replaced by its packed tensors."""
    replace = _quantized_source_keys(packed, family)
    sd: dict[str, torch.Tensor] = {}
    done = set()
    for _, shard in iter_shards(folder):
        for key, t in shard.items():
            stem = replace.get(key)
            if stem is None:
                sd[key] = t
            elif stem not in done:
                done.add(stem)
                for name, pt in packed[stem].items():
                    sd[f"{stem}.{name}"] = pt
    missing = sorted(set(packed) - done)
    if missing:  # every stem quantized came from a stored weight; this would be a key-map bug
        raise QuantizeError(f"quantized linears with no stored weight in {folder}: {missing[:4]}")
    return sd


__all__ = ["quantize_checkpoint", "QuantizeReport", "QuantizeError", "read_calibration", "calibration_ids",
           "builtin_calibration", "CalibrationRecord", "INSTALL"]
