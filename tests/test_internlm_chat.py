"""A tiny checkpoint in the upstream internlm-chat-7b layout: strict loading and the README chat API."""
import json
import shutil

import pytest
import torch

from xcomposer import InternLM, load_tokenizer
from xcomposer.llm.chat import build_chat_ids, format_prompt
from xcomposer.llm.checkpoint import CheckpointError
from xcomposer.llm.generation import PromptTooLongError
from xcomposer.tiny import write_tiny_internlm

from conftest import hf_twin

GREEDY = dict(do_sample=False, max_new_tokens=24)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    # the July 2023 revision: these tests pin its template (tests/test_prompt_revisions.py covers both)
    return {fmt: write_tiny_internlm(root / fmt, fmt=fmt, revision="2023-07") for fmt in ("bin", "safetensors")}


@pytest.fixture(scope="module")
def model(ckpts):
    return InternLM.from_pretrained(ckpts["safetensors"])


def test_layout_is_upstream(ckpts):
    for fmt, index in (("bin", "pytorch_model.bin.index.json"), ("safetensors", "model.safetensors.index.json")):
        folder = ckpts[fmt]
        weight_map = json.loads((folder / index).read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        assert len(shards) >= 3 and all((folder / s).is_file() for s in shards)
        assert "model.layers.0.self_attn.rotary_emb.inv_freq" in weight_map
        assert "lm_head.weight" in weight_map and "model.layers.1.self_attn.q_proj.bias" in weight_map
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["model_type"] == "internlm" and cfg["rotary"] == {"base": 10000, "type": "dynamic"}
        assert (folder / "tokenizer.model").is_file()


def test_both_formats_load_the_same_weights(ckpts, model):
    other = InternLM.from_pretrained(ckpts["bin"])
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(t.is_meta for t in a.values())
    assert model.tokenizer is not None and model.tokenizer.vocab_size == model.config.vocab_size


def test_dtype_option(ckpts):
    m = InternLM.from_pretrained(ckpts["bin"], dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and m.model.norm.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        InternLM.from_pretrained(ckpts["bin"], dtype="float8")


def test_prompt_template_is_internlm_chat(model):
    tok = model.tokenizer
    assert model.chat_template == "2023-07"
    text = format_prompt(tok, "hi", [("你好", "Hello!")], model.chat_template)
    assert text == "<|User|>:你好<eoh>\n<|Bot|>:Hello!<eoa>\n<|User|>:hi<eoh>\n<|Bot|>:"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.eoh_token_id) == 2 and ids.count(tok.eoa_token_id) == 1


def test_chat_is_deterministic_and_matches_transformers(model):
    tok = model.tokenizer
    r1, h1 = model.chat(tok, "hello", history=[], **GREEDY)
    r2, _ = model.chat(tok, "hello", history=[], **GREEDY)
    assert r1 == r2 and h1 == [("hello", r1)]
    # the same prompt through transformers' Llama with our weights gives the same reply
    ids, _ = build_chat_ids(tok, "hello", [], model.context_window, 24, model.chat_template)
    hf = hf_twin(model)
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=24, eos_token_id=[tok.eos_token_id, tok.eoa_token_id],
                      pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    stop = {tok.eos_token_id, tok.eoa_token_id}
    cut = next((i + 1 for i, t in enumerate(out) if t in stop), len(out))
    assert tok.decode(out[:cut]) == r1
    # seeded sampling (InternLM's default mode) repeats too
    s1, _ = model.chat(tok, "hello", seed=11, max_new_tokens=16)
    s2, _ = model.chat(tok, "hello", seed=11, max_new_tokens=16)
    assert s1 == s2


def test_multi_turn_history(model):
    tok = model.tokenizer
    r1, h1 = model.chat(tok, "first question", history=[], **GREEDY)
    r2, h2 = model.chat(tok, "second question", history=h1, **GREEDY)
    assert h2 == [("first question", r1), ("second question", r2)]
    ids, dropped = build_chat_ids(tok, "second question", h1, model.context_window, 24, model.chat_template)
    assert dropped == 0
    assert tok.decode(ids, skip_special_tokens=False).startswith(
        f"<s><|User|>:first question<eoh>\n<|Bot|>:{r1}<eoa>\n<|User|>:second question")


@pytest.mark.parametrize("beams", [1, 3])
def test_stream_chat_ends_with_chat_answer(model, beams):
    tok = model.tokenizer
    reply, hist = model.chat(tok, "请介绍一下你自己", history=[("hi", "hello")], num_beams=beams, **GREEDY)
    seen = list(model.stream_chat(tok, "请介绍一下你自己", history=[("hi", "hello")], num_beams=beams, **GREEDY))
    texts = [t for t, _ in seen]
    assert texts[-1] == reply and seen[-1][1] == hist
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # text only grows
    # every partial text is a prefix of the answer: no half character was ever shown and taken back
    # (a random model may emit stray bytes, which stay U+FFFD in the final answer too)
    assert all(reply.startswith(t) for t in texts)


def test_streamer_object_receives_tokens(model):
    tok = model.tokenizer

    class Collect:  # the transformers streamer protocol: put(tensor) ... end()
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t.flatten().tolist())

        def end(self):
            self.ended = True

    s = Collect()
    reply, _ = model.chat(tok, "hello", streamer=s, **GREEDY)
    assert s.ended and tok.decode(sum(s.puts[1:], [])) == reply
    assert s.puts[0][0] == tok.bos_token_id  # the prompt comes first, like transformers' generate


def test_history_overflow_drops_oldest_turns(model):
    tok = model.tokenizer
    long_turn = ("tell me a story " * 40, "once upon a time " * 40)
    history = [long_turn] * 6 + [("recent", "turn")]
    ids, dropped = build_chat_ids(tok, "next", history, model.context_window, 64, model.chat_template)
    assert 0 < dropped < len(history) and len(ids) + 64 <= model.context_window
    assert "recent" in tok.decode(ids)
    reply, new_history = model.chat(tok, "next", history=history, do_sample=False, max_new_tokens=8)
    assert new_history[:-1] == history  # the caller's turns are all kept, only the prompt is trimmed


def test_bad_chat_input(model):
    tok = model.tokenizer
    with pytest.raises(ValueError, match="query is empty"):
        model.chat(tok, "  ", history=[])
    with pytest.raises(TypeError, match="query must be a string"):
        model.chat(tok, None)
    with pytest.raises(ValueError, match=r"history\[0\] must be a \(query, reply\) pair"):
        model.chat(tok, "hi", history=["oops"])
    with pytest.raises(PromptTooLongError, match="context window is 512"):
        model.chat(tok, "word " * 2000, **GREEDY)
    with pytest.raises(ValueError, match="num_beams=0"):
        model.chat(tok, "hi", num_beams=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        model.chat(tok, "hi", temperature=-1)
    with pytest.raises(ValueError, match="top_p=1.5"):
        model.chat(tok, "hi", top_p=1.5)
    # the model still answers after all of that
    assert model.chat(tok, "hi", **GREEDY)[0] == model.chat(tok, "hi", **GREEDY)[0]


def test_broken_checkpoints_give_the_promised_errors(ckpts, tmp_path):
    src = ckpts["bin"]
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]

    corrupt = shutil.copytree(src, tmp_path / "corrupt")
    data = (corrupt / shard).read_bytes()
    (corrupt / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard):
        InternLM.from_pretrained(corrupt)

    missing = shutil.copytree(src, tmp_path / "missing")
    (missing / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        InternLM.from_pretrained(missing)

    renamed = shutil.copytree(src, tmp_path / "renamed")
    idx = json.loads((renamed / "pytorch_model.bin.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    target = renamed / idx["weight_map"][key]
    sd = torch.load(target, weights_only=True)
    sd["model.layers.1.mlp.upp_proj.weight"] = sd.pop(key)
    torch.save(sd, target)
    idx["weight_map"]["model.layers.1.mlp.upp_proj.weight"] = idx["weight_map"].pop(key)
    (renamed / "pytorch_model.bin.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as err:
        InternLM.from_pretrained(renamed)
    assert "upp_proj" in str(err.value) and key in str(err.value)

    no_config = shutil.copytree(src, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        InternLM.from_pretrained(no_config)


def test_hub_id_offline_says_how_to_use_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        InternLM.from_pretrained("internlm/internlm-chat-7b")
    msg = str(err.value)
    assert "internlm/internlm-chat-7b" in msg and "offline" in msg and "--local-dir" in msg


def test_load_tokenizer_from_folder(ckpts):
    tok = load_tokenizer(ckpts["bin"])
    assert tok.decode(tok.encode("hello 世界")) == "hello 世界"
