"""Strict, shard-at-a-time reading and writing of upstream checkpoint folders.

Generic over the model: the decoder loads its keys as they are, the vision-language model maps
its own prefixes through `key_map`. Layouts understood (the ones upstream publishes):

* `model.safetensors.index.json` + `model-0000K-of-0000N.safetensors`
* `pytorch_model.bin.index.json` + `pytorch_model-0000K-of-0000N.bin`
* a single `model.safetensors` or `pytorch_model.bin`
* auto_gptq's single `gptq_model-{bits}bit-{group}g.safetensors` (the name quantize_config.json gives)

GPTQ / AWQ folders (a `quantization_config` in config.json, or quantize_config.json) load into the
same model: the linears whose `.qweight` the checkpoint stores become packed modules first
(xcomposer.llm.packed_quant).

Loading is strict: a key the model lacks, a model key the checkpoint lacks, a wrong shape or a
key stored twice is a `CheckpointError`, because a silently half-loaded model produces fluent
garbage that is much harder to diagnose than an error at load time.
"""
from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .keys import CheckpointError, SplitKey  # defined apart so packed_quant can use them without a cycle

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"
_LOOKED_FOR = (SAFE_INDEX, BIN_INDEX, SAFE_SINGLE, BIN_SINGLE)

# "owner/name" with hub-legal characters; anything else is treated as a local path
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$")
_MAX_LISTED = 10


def _listing(items: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(repr(s) for s in items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


# -- remote code, read as text ----------------------------------------------------------------

def remote_code_defines(path: Path, name: str) -> bool:
    """Whether the Python file `path` uses the identifier `name` in its code (as a variable, argument,
    attribute or keyword), read as text and parsed, never imported or run. Comments and strings do not
    count. A file that does not parse is searched for the word instead."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return re.search(rf"\b{re.escape(name)}\b", text) is not None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id == name) or (isinstance(node, ast.arg) and node.arg == name) \
                or (isinstance(node, ast.Attribute) and node.attr == name) \
                or (isinstance(node, ast.keyword) and node.arg == name):
            return True
    return False


# -- locating a checkpoint ------------------------------------------------------------------

def _hub_offline() -> bool:
    # read the variable at call time too: huggingface_hub only reads it once, at import
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    try:
        from huggingface_hub import constants
        return env or bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return env


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, *, allow_patterns: list[str] | None = None) -> Path:
    """A local checkpoint folder, downloading `owner/name` hub ids into the hub cache first."""
    text = os.fspath(path_or_hub_id)
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(
            f"{local} is a file, not a checkpoint folder: pass the folder that holds config.json and the weights")
    looks_local = isinstance(path_or_hub_id, os.PathLike) or text.startswith(("/", "./", "../", "~", "\\")) \
        or not _HUB_ID.match(text)
    if looks_local:
        raise CheckpointError(f"checkpoint folder not found: {local.absolute()}; check the path")
    return _download(text, allow_patterns)


def checkpoint_folder(path_or_hub_id: str | os.PathLike, kind: str) -> tuple[Path, Path]:
    """(folder, its config.json) for a local folder or hub id holding a `kind` checkpoint."""
    folder = resolve_checkpoint(path_or_hub_id, allow_patterns=["*.json", "*.bin", "*.safetensors",
                                                                 "tokenizer.model", "*.py"])
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} not found: an {kind} checkpoint folder needs its config.json")
    return folder, cfg_file


def _download(repo_id: str, allow_patterns: list[str] | None) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    offline = _hub_offline()
    fix = (f"To use a local copy instead, download it where the hub is reachable with "
           f"`huggingface-cli download {repo_id} --local-dir DIR`, then pass DIR (a folder path) here.")
    tried = f"'{repo_id}' is not a local folder, so it was looked up as a Hugging Face hub repo"
    try:
        # offline: only the local hub cache is consulted, so a cached snapshot still works
        got = huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=offline)
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError, hf_errors.RevisionNotFoundError) as e:
        raise CheckpointError(f"{tried}, but the repo was not found or access was denied ({type(e).__name__}). "
                              f"Check the id and your token. {fix}") from e
    except hf_errors.LocalEntryNotFoundError as e:
        why = ("offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local hub cache" if offline
               else "the hub could not be reached and it is not in the local hub cache")
        raise CheckpointError(f"{tried}, but {why}. {fix}") from e
    except Exception as e:  # connection errors come from whichever HTTP client the hub library uses
        raise CheckpointError(f"{tried}, but the hub could not be reached or the download failed "
                              f"({type(e).__name__}: {e}). {fix}") from e
    folder = Path(got)
    if not folder.is_dir():
        raise CheckpointError(f"downloading '{repo_id}' gave {folder}, which is not a folder; {fix}")
    return folder


# -- listing and reading shards ------------------------------------------------------------

def _read_index(folder: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """Shard paths in load order, the index's key -> file map and the index path (None without index)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}; pass the folder holding the weights")
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map is not a mapping of key -> file name")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"index {index} is unreadable ({type(e).__name__}: {e}); "
                                  f"re-download {index_name} with the shards") from e
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(f"index {index} lists shard file(s) missing from {folder}: {_listing(missing)}; "
                                  f"the download is incomplete: re-download them")
        return shards, weight_map, index
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (folder / single).is_file():
            return [folder / single], None, None
    gptq = _gptq_single(folder)
    if gptq is not None:
        return [gptq], None, None
    present = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(
        f"no weights in {folder}: looked for {', '.join(_LOOKED_FOR)}; the folder holds "
        f"{_listing(present) if present else 'nothing'}. Pass the folder that holds the checkpoint shards")


def _gptq_single(folder: Path) -> Path | None:
    """auto_gptq's single weights file: `{model_file_base_name}.safetensors` (or `.bin`) named in
    quantize_config.json, by default `gptq_model-{bits}bit-{group_size}g.*` (auto_gptq `save_quantized`)."""
    if not (folder / "quantize_config.json").is_file():
        return None
    try:
        base = json.loads((folder / "quantize_config.json").read_text(encoding="utf-8")).get("model_file_base_name")
    except (OSError, ValueError, AttributeError):
        base = None
    for ext in (".safetensors", ".bin"):
        if isinstance(base, str) and base and (folder / (base + ext)).is_file():
            return folder / (base + ext)
        found = sorted(folder.glob(f"gptq_model-*{ext}"))
        if len(found) == 1:
            return found[0]
    return None


def _shard_keys(path: Path) -> list[str]:
    """The tensor names of one weights file (safetensors: from its header, nothing read)."""
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:
            raise CheckpointError(f"cannot read shard {path} ({type(e).__name__}: {e}); the file is corrupted or "
                                  f"truncated: re-download {path.name}") from e
    return list(_load_shard(path))


def _packed_plan(model: nn.Module, folder: Path, weight_map: dict[str, str] | None, key_map, checkpoint_name, select):
    """A GPTQ / AWQ folder (xcomposer.llm.packed_quant): swap the model's quantized linears for
    packed modules and return the routing plan; None for an unquantized folder."""
    from .packed_loading import prepare_packed_loading
    from .packed_quant import read_packed_quantization

    spec = read_packed_quantization(folder)
    if spec is None:
        return None
    if select is not None:
        raise CheckpointError(f"{folder} holds {spec.describe()} weights, which are not split across tensor-parallel "
                              f"ranks yet: load it on one GPU (--tp 1)")
    keys = list(weight_map) if weight_map is not None else _shard_keys(_read_index(folder)[0][0])
    return prepare_packed_loading(model, spec, keys, key_map=key_map, checkpoint_name=checkpoint_name)


def list_shards(folder: Path) -> list[Path]:
    """Weight files of a checkpoint folder, preferring safetensors and indexed layouts."""
    return _read_index(Path(folder))[0]


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    fix = f"the file is corrupted or truncated: re-download {path.name}"
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(f"cannot read shard {path} ({type(e).__name__}: {e}); {fix}") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        # legacy (pre-zip) files cannot be memory-mapped; a damaged file fails again below
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read shard {path} ({type(e).__name__}: {e}); {fix}") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"shard {path} is not a flat dict of name -> tensor ({type(sd).__name__}); "
                              f"it is not a state-dict checkpoint: re-export it with save_checkpoint")
    return sd


def iter_shards(folder: Path) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """(shard path, its tensors) one shard at a time; the caller drops each dict before the next."""
    shards, weight_map, index = _read_index(Path(folder))
    expected: dict[str, list[str]] = {}
    for key, name in (weight_map or {}).items():
        expected.setdefault(name, []).append(key)
    for path in shards:
        sd = _load_shard(path)
        absent = [k for k in expected.get(path.name, []) if k not in sd]
        if absent:
            raise CheckpointError(f"index {index} maps key(s) {_listing(absent)} to shard {path} but the shard "
                                  f"does not contain them; the shard and index disagree: re-download both")
        yield path, sd
        del sd  # the next shard is read only after this one is released


# -- loading into a model ------------------------------------------------------------------

def _default_skip(key: str) -> bool:
    # upstream shards carry the rotary inverse frequencies, which the model derives itself
    return key.endswith("rotary_emb.inv_freq")


class _Slots:
    """Every parameter / persistent buffer name of a model, with ties found by tensor identity."""

    def __init__(self, model: nn.Module):
        self.where: dict[str, tuple[nn.Module, str, bool]] = {}  # name -> (module, attr, is_param)
        self.shape: dict[str, torch.Size] = {}
        groups: dict[int, list[str]] = {}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            for attr, p in mod._parameters.items():
                if p is not None:
                    self._add(prefix + attr, mod, attr, True, p, groups)
            for attr, b in mod._buffers.items():
                if b is not None and attr not in mod._non_persistent_buffers_set:
                    self._add(prefix + attr, mod, attr, False, b, groups)
        self.group: dict[str, list[str]] = {n: g for g in groups.values() for n in g}

    def _add(self, name: str, mod: nn.Module, attr: str, is_param: bool, t: torch.Tensor,
             groups: dict[int, list[str]]) -> None:
        if name in self.where:  # a module registered twice under one path
            return
        self.where[name] = (mod, attr, is_param)
        self.shape[name] = t.shape
        groups.setdefault(id(t), []).append(name)

    def assign(self, name: str, t: torch.Tensor) -> None:
        # one new object for the whole tie group keeps tied weights tied
        _, _, is_param = self.where[name]
        value = nn.Parameter(t, requires_grad=False) if is_param else t
        for n in self.group[name]:
            mod, attr, _ = self.where[n]
            (mod._parameters if is_param else mod._buffers)[attr] = value

    def current(self, name: str) -> torch.Tensor:
        mod, attr, is_param = self.where[name]
        return (mod._parameters if is_param else mod._buffers)[attr]


class LoRAMerge:
    """Folds LoRA adapters into their base weights while a checkpoint streams in.

    Upstream XComposer stores some LLM projections as `X.weight` (+ `X.bias`) with adapters
    `X.lora_A.weight` (r, in) and `X.lora_B.weight` (out, r); the layer computes
    `x W^T + b + scale * (x A^T) B^T` with `scale = lora_alpha / lora_r`. Merging gives one plain
    weight `W + scale * B @ A` (done in float32), so the decoder needs no adapter code. The three
    tensors may sit in different shards: the first ones wait until the last arrives.
    """

    SUFFIX_A, SUFFIX_B = ".lora_A.weight", ".lora_B.weight"

    def __init__(self, scale: float):
        self.scale = float(scale)

    def base_of(self, key: str) -> str | None:
        """The base weight key an adapter key belongs to; None for any other key."""
        for suffix in (self.SUFFIX_A, self.SUFFIX_B):
            if key.endswith(suffix):
                return key[: -len(suffix)] + ".weight"
        return None

    def bases(self, keys) -> set[str]:
        return {b for k in keys if (b := self.base_of(k)) is not None}

    def check_complete(self, keys, where: str) -> None:
        """Every adapter has its partner and its base weight (with an index: before any read)."""
        keys = set(keys)
        for base in sorted(self.bases(keys)):
            stem = base[: -len(".weight")]
            need = [base, stem + self.SUFFIX_A, stem + self.SUFFIX_B]
            absent = [k for k in need if k not in keys]
            if absent:
                raise CheckpointError(f"LoRA weights for {stem!r} are incomplete in {where}: missing "
                                      f"{_listing(absent)}; the checkpoint is damaged or mixes exports: "
                                      f"re-download it")

    def merge(self, base: str, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointError(f"LoRA shapes do not fit {base!r}: weight {tuple(w.shape)}, lora_A "
                                  f"{tuple(a.shape)}, lora_B {tuple(b.shape)} (expected (out, in), (r, in), "
                                  f"(out, r)); config.json does not describe these weights")
        merged = w.float() + self.scale * (b.float() @ a.float())
        return merged.to(w.dtype)


def _mismatch_message(folder: Path, unexpected: list[str], missing: list[str],
                      ckpt_name: Callable[[str], str | None] | None = None) -> str:
    if ckpt_name is not None:  # name missing tensors the way the checkpoint would have stored them
        named = []
        for n in missing:
            k = ckpt_name(n)
            named.append(n if not k or k == n else f"{k} (our {n})")
        missing = named
    parts = [f"checkpoint {folder} does not match the model:"]
    if unexpected:
        parts.append(f"{len(unexpected)} checkpoint key(s) the model does not have: {_listing(unexpected)};")
    if missing:
        parts.append(f"{len(missing)} model key(s) the checkpoint does not provide: {_listing(missing)};")
    parts.append("the checkpoint is incomplete or of another architecture: check config.json against the "
                 "weights, re-download missing shards, or map/skip the keys with key_map/skip")
    return " ".join(parts)


def _entries(folder: Path, weight_map: dict[str, str] | None, lora: LoRAMerge | None):
    """(shard path, checkpoint key, tensor) one at a time, with LoRA adapters merged when asked."""
    pending: dict[str, dict[str, torch.Tensor]] = {}  # base key -> the pieces seen so far
    with_lora: set[str] | None = None if weight_map is None or lora is None else lora.bases(weight_map)
    for path, sd in iter_shards(folder):
        if lora is not None and with_lora is None:  # a single file: its own keys are all the keys
            lora.check_complete(sd, str(path))
            with_lora = lora.bases(sd)
        for key in list(sd):
            tensor = sd.pop(key)  # release source tensors as they are consumed
            if lora is None or (key not in with_lora and lora.base_of(key) is None):
                yield path, key, tensor
                continue
            base = lora.base_of(key) or key
            role = "w" if base == key else ("a" if key.endswith(lora.SUFFIX_A) else "b")
            pieces = pending.setdefault(base, {})
            pieces[role] = tensor
            if len(pieces) == 3:
                del pending[base]
                yield path, base, lora.merge(base, pieces["w"], pieces["a"], pieces["b"])
        del sd  # drop this shard before iter_shards reads the next one
    if pending:
        raise CheckpointError(f"LoRA weights never completed for {_listing(sorted(pending))}; the shards and "
                              f"index disagree: re-download the checkpoint")


def load_checkpoint_into(
    model: nn.Module,
    folder: Path,
    *,
    device: str | torch.device | Callable[[str], str | torch.device] = "cpu",
    dtype: torch.dtype | None = None,
    key_map: Callable[[str], str | None] | None = None,
    skip: Callable[[str], bool] | None = None,
    lora: LoRAMerge | None = None,
    checkpoint_name: Callable[[str], str | None] | None = None,
    select: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Fill every parameter and persistent buffer of `model` (typically built on `meta`) from `folder`.

    `key_map` renames a checkpoint key to the model's name (None drops it); `skip` is asked about the
    checkpoint key as stored (default: derivable `rotary_emb.inv_freq`). Floating tensors become
    `dtype` when given. Loaded tensors do not require grad. Non-persistent buffers are left alone:
    the model rebuilds them (e.g. `setup_rope`). With `lora`, adapter keys are merged into their
    base weights (named by the checkpoint key) before `skip`/`key_map` see them.
    `checkpoint_name` (the inverse of `key_map`) lets errors name missing tensors by their
    checkpoint key. `device` may be a function of the model name (a multi-GPU placement): each
    tensor then goes straight to its own device.
    `select(name, tensor)` gives the part of each tensor this model keeps (a tensor-parallel rank's
    slice, `parallel.tensor_parallel.rank_slicer`): the shapes checked are the model's, and only
    that part is copied, so a rank never holds the whole model.
    A GPTQ / AWQ folder (`packed_quant.read_packed_quantization`) first swaps each linear whose
    `<stem>.qweight` is stored for a `GPTQLinear` / `AWQLinear` and routes `qweight/qzeros/scales/
    g_idx` into it (split like `key_map` splits the stem's weight); those tensors keep their stored
    dtypes, and `state_dict()` gives them back under the checkpoint's keys.
    """
    folder = Path(folder)
    key_map = key_map or (lambda k: k)
    skip = skip or _default_skip
    # GPTQ / AWQ folders: the quantized linears become packed modules before the slots are listed
    packed = _packed_plan(model, folder, _read_index(folder)[1], key_map, checkpoint_name, select)
    if packed is not None:
        key_map, checkpoint_name = packed.key_map, packed.checkpoint_name
    slots = _Slots(model)

    def target(key: str) -> str | None:
        return None if skip(key) else key_map(key)

    def targets(key: str) -> tuple[str, ...]:
        name = target(key)
        return () if name is None else name.names if isinstance(name, SplitKey) else (name,)

    # with an index the key sets are known before any tensor is read: fail fast and completely
    _, weight_map, index = _read_index(folder)
    if weight_map is not None:
        if lora is not None:
            lora.check_complete(weight_map, str(index))
        names: dict[str, str] = {}  # model name -> the first "key (shard)" that provides it
        for key, shard in weight_map.items():
            if lora is not None and lora.base_of(key) is not None:
                continue  # an adapter: it ends up inside its base weight
            for name in targets(key):
                names.setdefault(name, f"{name} (shard {shard})" if name == key
                                 else f"{name} (from {key}, shard {shard})")
        unexpected = [where for n, where in names.items() if n not in slots.where]
        covered = {m for n in names if n in slots.group for m in slots.group[n]}
        missing = [n for n in slots.where if n not in covered]
        if unexpected or missing:
            raise CheckpointError(_mismatch_message(folder, unexpected, missing, checkpoint_name))

    loaded: dict[str, tuple[str, str]] = {}  # model name -> (checkpoint key, shard name)
    unexpected = []
    def pieces(path: Path, key: str, tensor: torch.Tensor):
        name = target(key)
        if not isinstance(name, SplitKey):
            return [(name, tensor)]
        try:
            parts = name.split(tensor)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot split {key!r} (shard {path}) of shape {tuple(tensor.shape)} into "
                                  f"{', '.join(name.names)}: {e}; config.json does not describe these weights") from e
        return list(zip(name.names, parts))

    for path, key, whole in _entries(folder, weight_map, lora):
        for name, tensor in pieces(path, key, whole):
            if name is None:
                continue
            if name not in slots.where:
                unexpected.append(f"{name} (shard {path.name})" if name == key
                                  else f"{name} (from {key}, shard {path.name})")
                continue
            if select is not None:
                tensor = select(name, tensor)
            if name in loaded:
                first_key, first_shard = loaded[name]
                raise CheckpointError(f"key {name!r} is stored twice: as {first_key!r} in shard {first_shard} and "
                                      f"as {key!r} in shard {path.name}; the checkpoint folder mixes files "
                                      f"from different exports: re-download it")
            owner, attr, _ = slots.where[name]
            if tensor.shape != slots.shape[name]:
                if hasattr(owner, "shape_mismatch"):  # a GPTQ / AWQ tensor: say which config field is off
                    raise CheckpointError(owner.shape_mismatch(attr, key, tuple(tensor.shape), f"shard {path.name}"))
                raise CheckpointError(f"shape mismatch for {name!r} in shard {path}: checkpoint has "
                                      f"{tuple(tensor.shape)}, the model expects {tuple(slots.shape[name])}; "
                                      f"config.json does not describe these weights")
            if hasattr(owner, "check_tensor"):
                owner.check_tensor(attr, key, tensor, f"shard {path.name}")
            # packed modules keep their stored dtypes (fp16 scales would round in bf16)
            keep = getattr(owner, "keep_checkpoint_dtype", False)
            convert = dtype if dtype is not None and tensor.is_floating_point() and not keep else None
            tensor = tensor.to(device=device(name) if callable(device) else device, dtype=convert)
            tied_done = [n for n in slots.group[name] if n in loaded]
            if tied_done:
                # the checkpoint stores a tied tensor under a second name: it must be the same tensor
                if not torch.equal(slots.current(name).data, tensor):
                    raise CheckpointError(
                        f"{name!r} (shard {path.name}) and {tied_done[0]!r} are tied in the model but differ "
                        f"in the checkpoint; the weights are untied: set tie_word_embeddings=False in config.json")
            else:
                slots.assign(name, tensor)
            loaded[name] = (key, path.name)
            del tensor
        del whole

    covered = {m for n in loaded for m in slots.group[n]}
    missing = [n for n in slots.where if n not in covered]
    if unexpected or missing:
        raise CheckpointError(_mismatch_message(folder, unexpected, missing, checkpoint_name))
    if packed is not None:
        packed.finish(model, device)


# -- saving --------------------------------------------------------------------------------

def _plan_shards(state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state_dict.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards if shards[0] else []


def _owned(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    # safetensors refuses shared storage and torch.save writes a view's whole storage: give every
    # tensor its own exact-size contiguous storage
    t = t.detach()
    if t.device.type == "meta":
        raise CheckpointError("cannot save a tensor on the meta device: load or initialise the weights first")
    t = t.cpu().contiguous()
    storage = t.untyped_storage()
    if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
        t = t.clone()
    seen.add(t.untyped_storage().data_ptr())
    return t


def _write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def save_checkpoint(
    state_dict: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    *,
    fmt: str = "safetensors",
    max_shard_bytes: int = 5 * 2**30,
) -> list[Path]:
    """Write `state_dict` in the upstream layout for `fmt` ("safetensors" or "bin"); returns the shard paths.

    More than one shard also writes the index JSON. Every file is written under a temporary name
    and renamed only once all shards are complete, so an interrupted save leaves no shard or index
    under a final name. Older files of the same format in `folder` are removed afterwards so they
    cannot shadow the new ones.
    """
    if fmt not in ("safetensors", "bin"):
        raise CheckpointError(f"unknown checkpoint format {fmt!r}: use 'safetensors' or 'bin'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "bin" and any((folder / n).exists() for n in (SAFE_INDEX, SAFE_SINGLE)):
        raise CheckpointError(f"{folder} already holds safetensors weights, which loading prefers over .bin: "
                              f"save into an empty folder or delete them first")
    stem, ext, index_name = (("model", "safetensors", SAFE_INDEX) if fmt == "safetensors"
                             else ("pytorch_model", "bin", BIN_INDEX))
    plan = _plan_shards(state_dict, max_shard_bytes)
    if not plan:
        raise CheckpointError("refusing to save an empty state dict: there are no tensors to write")
    n = len(plan)
    names = [f"{stem}.{ext}"] if n == 1 else [f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)]

    done: list[tuple[Path, Path]] = []  # (temporary, final)
    weight_map: dict[str, str] = {}
    total = 0
    seen: set[int] = set()
    try:
        for keys, name in zip(plan, names):
            shard = {k: _owned(state_dict[k], seen) for k in keys}
            total += sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update((k, name) for k in keys)
            if fmt == "safetensors":
                def write(p: Path, shard=shard) -> None:
                    safetensors.torch.save_file(shard, str(p), metadata={"format": "pt"})
            else:
                def write(p: Path, shard=shard) -> None:
                    torch.save(shard, p)
            done.append((_write_atomic(folder / name, write), folder / name))
            del shard
        if n > 1:
            text = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            done.append((_write_atomic(folder / index_name, lambda p: p.write_text(text + "\n")),
                         folder / index_name))
    except BaseException:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)
        raise
    # index last, so a reader never sees an index naming shards that are not there yet
    for tmp, final in done:
        os.replace(tmp, final)
    keep = {final.name for _, final in done}
    stale = [folder / f"{stem}.{ext}", folder / index_name, *folder.glob(f"{stem}-*-of-*.{ext}")]
    for p in stale:
        if p.name not in keep:
            p.unlink(missing_ok=True)
    return [folder / name for name in names]


__all__ = ["CheckpointError", "SplitKey", "LoRAMerge", "checkpoint_folder", "resolve_checkpoint", "list_shards", "iter_shards",
           "load_checkpoint_into", "save_checkpoint"]
