"""Checkpoint folders: sharded save/load round trips in both upstream formats, and the errors."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors
import pytest
import safetensors.torch
import torch

from xcomposer.llm import checkpoint as ck
from xcomposer.llm.checkpoint import (CheckpointError, iter_shards, list_shards, load_checkpoint_into,
                                  resolve_checkpoint, save_checkpoint)
from xcomposer.llm.config import InternLMConfig
from xcomposer.llm.decoder import InternLMForCausalLM

SHARD_BYTES = 120_000  # the tiny model is ~0.6 MB in fp32: several shards


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    # a test that reaches for the network must fail loudly rather than hang or pass by luck
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted in a checkpoint test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tiny_cfg(**kw) -> InternLMConfig:
    base = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64)
    return InternLMConfig(**{**base, **kw})


def tiny_model(**kw) -> InternLMForCausalLM:
    torch.manual_seed(0)
    model = InternLMForCausalLM(tiny_cfg(**kw))
    model.init_weights()
    return model.eval()


def meta_model(cfg: InternLMConfig) -> InternLMForCausalLM:
    with torch.device("meta"):
        return InternLMForCausalLM(cfg)


def upstream_state(model: InternLMForCausalLM) -> dict[str, torch.Tensor]:
    """The model's state dict with the derivable rotary buffers real shards also carry."""
    sd = dict(model.state_dict())
    head_dim = model.config.head_dim
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        out[key] = t
        if key.endswith("self_attn.o_proj.bias"):
            out[key.replace("o_proj.bias", "rotary_emb.inv_freq")] = \
                1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return out


def write_checkpoint(folder: Path, model: InternLMForCausalLM, fmt: str, state=None,
                     max_shard_bytes: int = SHARD_BYTES) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    return save_checkpoint(upstream_state(model) if state is None else state, folder, fmt=fmt,
                           max_shard_bytes=max_shard_bytes)


@pytest.fixture(scope="module")
def ref() -> InternLMForCausalLM:
    return tiny_model()


def load_fresh(folder: Path, **kw) -> InternLMForCausalLM:
    cfg = InternLMConfig.from_json(folder / "config.json")
    model = meta_model(cfg)
    load_checkpoint_into(model, folder, **kw)
    return model.eval()


# -- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_round_trip(tmp_path, ref, fmt):
    shards = write_checkpoint(tmp_path, ref, fmt)
    assert len(shards) >= 3
    index_name = ck.SAFE_INDEX if fmt == "safetensors" else ck.BIN_INDEX
    index = json.loads((tmp_path / index_name).read_text())
    assert index["metadata"]["total_size"] > 0
    assert list(index["weight_map"]) == list(upstream_state(ref))  # insertion order kept
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    assert shards[0].name == f"{stem}-00001-of-{len(shards):05d}.{fmt}"
    assert list_shards(tmp_path) == shards
    assert not list(tmp_path.glob(".*tmp*"))

    model = load_fresh(tmp_path)
    want = ref.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    for key, t in want.items():
        assert got[key].device.type == "cpu" and torch.equal(got[key], t), key
    assert not any(p.requires_grad for p in model.parameters())

    model.setup_rope(64)
    ids = torch.randint(0, ref.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))


def test_single_file_layout_and_stale_files(tmp_path, ref):
    write_checkpoint(tmp_path, ref, "safetensors")  # sharded first
    shards = write_checkpoint(tmp_path, ref, "safetensors", max_shard_bytes=2**30)
    assert [p.name for p in shards] == ["model.safetensors"]
    # the old index and shards would shadow the new file: they are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with safetensors.safe_open(shards[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}
    model = load_fresh(tmp_path)
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)


def test_single_bin_and_legacy_bin(tmp_path, ref):
    write_checkpoint(tmp_path, ref, "bin", max_shard_bytes=2**30)
    assert list_shards(tmp_path) == [tmp_path / "pytorch_model.bin"]
    # pre-zip torch.save files cannot be memory-mapped: the loader falls back
    torch.save(upstream_state(ref), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = load_fresh(tmp_path)
    assert torch.equal(model.model.norm.weight, ref.model.norm.weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_conversion(tmp_path, ref, dtype):
    write_checkpoint(tmp_path, ref, "safetensors")
    model = load_fresh(tmp_path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, ref.model.layers[1].mlp.up_proj.weight.to(dtype))


def test_key_map_and_skip(tmp_path, ref):
    # a vision-language checkpoint nests the decoder under a prefix next to other modules
    state = {f"internlm_model.{k}": v for k, v in upstream_state(ref).items()}
    state["query_tokens"] = torch.zeros(1, 4, 8)
    write_checkpoint(tmp_path, ref, "bin", state=state)
    prefix = "internlm_model."
    model = load_fresh(tmp_path, key_map=lambda k: k[len(prefix):] if k.startswith(prefix) else None)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)

    # without the default skip the inv_freq buffers are unexpected keys
    with pytest.raises(CheckpointError, match="rotary_emb.inv_freq"):
        load_fresh(tmp_path, key_map=lambda k: k[len(prefix):] if k.startswith(prefix) else None,
                   skip=lambda k: False)


@pytest.mark.parametrize("store_both", [False, True])
def test_tied_embeddings(tmp_path, store_both):
    ref = tiny_model(tie_word_embeddings=True)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    state = upstream_state(ref)
    if not store_both:
        del state["lm_head.weight"]
    write_checkpoint(tmp_path, ref, "safetensors", state=state)
    model = load_fresh(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight)
    model.setup_rope(64)
    ids = torch.randint(0, 384, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))


def test_tied_in_model_but_untied_in_checkpoint(tmp_path, ref):
    state = upstream_state(ref)  # untied reference: lm_head differs from embed_tokens
    write_checkpoint(tmp_path, ref, "safetensors", state=state)
    model = meta_model(tiny_cfg(tie_word_embeddings=True))
    with pytest.raises(CheckpointError, match="tie_word_embeddings=False"):
        load_checkpoint_into(model, tmp_path)


def test_iter_shards_one_at_a_time(tmp_path, ref):
    shards = write_checkpoint(tmp_path, ref, "bin")
    seen = []
    for path, sd in iter_shards(tmp_path):
        seen.append(path)
        assert all(isinstance(t, torch.Tensor) for t in sd.values())
        del sd
    assert seen == shards


# -- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_shard(tmp_path, ref, fmt, damage):
    shards = write_checkpoint(tmp_path, ref, fmt)
    victim = shards[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x17" * 64 + data[64:])
    with pytest.raises(CheckpointError) as e:
        load_fresh(tmp_path)
    assert victim.name in str(e.value) and "re-download" in str(e.value)


def test_missing_shard_file(tmp_path, ref):
    shards = write_checkpoint(tmp_path, ref, "safetensors")
    shards[2].unlink()
    with pytest.raises(CheckpointError) as e:
        list_shards(tmp_path)
    assert shards[2].name in str(e.value) and ck.SAFE_INDEX in str(e.value)


def test_index_key_absent_from_shard(tmp_path, ref):
    shards = write_checkpoint(tmp_path, ref, "safetensors")
    sd = safetensors.torch.load_file(shards[0])
    gone = next(iter(sd))
    del sd[gone]
    safetensors.torch.save_file(sd, shards[0])
    with pytest.raises(CheckpointError) as e:
        list(iter_shards(tmp_path))
    assert gone in str(e.value) and shards[0].name in str(e.value)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_renamed_key(tmp_path, ref, fmt):
    state = upstream_state(ref)
    old, new = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.gate_projection.weight"
    state = {(new if k == old else k): v for k, v in state.items()}
    write_checkpoint(tmp_path, ref, fmt, state=state)
    with pytest.raises(CheckpointError) as e:
        load_fresh(tmp_path)
    msg = str(e.value)
    assert new in msg and old in msg and "another architecture" in msg


def test_renamed_key_without_index(tmp_path, ref):
    # no index: the mismatch is found while reading, and both names are still reported
    state = upstream_state(ref)
    state["model.norm.scale"] = state.pop("model.norm.weight")
    write_checkpoint(tmp_path, ref, "bin", state=state, max_shard_bytes=2**30)
    with pytest.raises(CheckpointError) as e:
        load_fresh(tmp_path)
    msg = str(e.value)
    assert "model.norm.scale" in msg and "pytorch_model.bin" in msg and "model.norm.weight" in msg


def test_wrong_shape(tmp_path, ref):
    state = upstream_state(ref)
    key = "model.layers.0.self_attn.k_proj.weight"
    state[key] = torch.zeros(32, 64)
    shards = write_checkpoint(tmp_path, ref, "safetensors", state=state)
    with pytest.raises(CheckpointError) as e:
        load_fresh(tmp_path)
    msg = str(e.value)
    shard = json.loads((tmp_path / ck.SAFE_INDEX).read_text())["weight_map"][key]
    assert key in msg and "(32, 64)" in msg and "(64, 64)" in msg and shard in msg
    assert shard in {p.name for p in shards}


def test_duplicate_key_across_shards(tmp_path, ref):
    shards = write_checkpoint(tmp_path, ref, "bin")
    dup = "model.norm.weight"
    first = torch.load(shards[0], weights_only=True)
    assert dup not in first
    first[dup] = ref.model.norm.weight.detach().clone()
    torch.save(first, shards[0])
    with pytest.raises(CheckpointError) as e:
        load_fresh(tmp_path)
    msg = str(e.value)
    owner = json.loads((tmp_path / ck.BIN_INDEX).read_text())["weight_map"][dup]
    assert dup in msg and "twice" in msg and shards[0].name in msg and owner in msg


def test_bad_index_json(tmp_path, ref):
    write_checkpoint(tmp_path, ref, "bin")
    (tmp_path / ck.BIN_INDEX).write_text('{"weight_map": {"a": ')
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json"):
        list_shards(tmp_path)


def test_empty_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        list_shards(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and all(n in msg for n in (ck.SAFE_INDEX, ck.BIN_INDEX, "model.safetensors",
                                                           "pytorch_model.bin", "config.json"))


# -- resolving -----------------------------------------------------------------------------

def test_resolve_local_folder(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path
    assert resolve_checkpoint(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("path", ["./no/such/dir", "/no/such/dir", "~/no-such-ckpt-dir", "no-such-dir"])
def test_resolve_missing_local(path):
    with pytest.raises(CheckpointError, match="folder not found"):
        resolve_checkpoint(path)


def test_resolve_file_is_not_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(f)


def test_resolve_hub_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.chdir(tmp_path)  # "owner/name" must not exist as a relative folder
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("someone/missing-model")
    msg = str(e.value)
    assert "someone/missing-model" in msg and "offline" in msg
    assert "huggingface-cli download someone/missing-model --local-dir DIR" in msg


def test_resolve_hub_calls(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_checkpoint("internlm/tiny", allow_patterns=["*.json"]) == tmp_path
    assert calls == [("internlm/tiny", {"allow_patterns": ["*.json"], "local_files_only": False})]

    def unreachable(repo_id, **kw):
        raise ConnectionError("name resolution failed")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("internlm/tiny")
    assert "internlm/tiny" in str(e.value) and "could not be reached" in str(e.value)

    def not_found(repo_id, **kw):
        raise huggingface_hub.errors.RepositoryNotFoundError.__new__(huggingface_hub.errors.RepositoryNotFoundError)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(CheckpointError, match="repo was not found") as e:
        resolve_checkpoint("internlm/tiny")
    assert "--local-dir" in str(e.value)


# -- saving --------------------------------------------------------------------------------

def test_atomic_save(monkeypatch, tmp_path, ref):
    real = safetensors.torch.save_file
    calls = []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # die half-way through writing the second shard
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full")
        real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(safetensors.torch, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(upstream_state(ref), tmp_path, max_shard_bytes=SHARD_BYTES)
    assert list(tmp_path.iterdir()) == []  # neither final names nor temporary leftovers


def test_save_clones_shared_and_views(tmp_path):
    big = torch.arange(40_000.0).reshape(200, 200)
    # shared storage, a small view of a big storage, a non-contiguous view
    state = {"a": big[:2], "b": big[:2], "c": big[5:7], "d": big[:3, :4].t()}
    save_checkpoint(state, tmp_path, fmt="safetensors")
    save_checkpoint(state, tmp_path / "bin", fmt="bin")
    for folder in (tmp_path, tmp_path / "bin"):
        for _, sd in iter_shards(folder):
            assert list(sd) == ["a", "b", "c", "d"]
            for k, t in state.items():
                assert torch.equal(sd[k], t)
    # only the viewed elements are written, not the 160 kB storage behind them
    assert (tmp_path / "bin" / "pytorch_model.bin").stat().st_size < 16_000


def test_save_refuses_bad_input(tmp_path):
    with pytest.raises(CheckpointError, match="format"):
        save_checkpoint({"a": torch.zeros(1)}, tmp_path, fmt="pt")
    with pytest.raises(CheckpointError, match="meta"):
        save_checkpoint({"a": torch.zeros(1, device="meta")}, tmp_path)
    save_checkpoint({"a": torch.zeros(1)}, tmp_path)
    with pytest.raises(CheckpointError, match="safetensors"):
        save_checkpoint({"a": torch.zeros(1)}, tmp_path, fmt="bin")


def test_hub_downloads_fetch_the_remote_code_files_that_tell_revisions_apart(monkeypatch, tmp_path):
    """The *.py files are fetched (read as text to pick the prompt revision, never run). The hub is a
    named test double here: no hub is reachable."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    seen = []

    def hub_double(repo_id, **kw):
        seen.append(kw["allow_patterns"])
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_double)
    assert ck.checkpoint_folder("internlm/internlm-xcomposer-7b", "XComposer") == (tmp_path, tmp_path / "config.json")
    assert "*.py" in seen[0] and "tokenizer.model" in seen[0] and "*.safetensors" in seen[0]
