"""A tiny InternLM2 checkpoint in the upstream layout: strict loading, the tokenizer's chat tokens,
the chatml template (exact ids), chat/stream_chat/generate, overrides and bad input."""
import json
import shutil

import pytest
import safetensors.torch
import sentencepiece as spm
import torch

from xcomposer import InternLM, load_tokenizer
from xcomposer.llm.chat import INTERNLM2_META_INSTRUCTION, build_chatml_ids
from xcomposer.llm.checkpoint import CheckpointError, iter_shards
from xcomposer.llm.config import InternLM2Config, config_from_json
from xcomposer.llm.generation import PromptTooLongError
from xcomposer.tiny import INTERNLM2_CHAT_TOKENS, write_tiny_internlm, write_tiny_internlm2

from conftest import hf_twin
from internlm2_util import hf_llama, reset_hf_rope

GREEDY = dict(do_sample=False, max_new_tokens=16)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt2")
    return {fmt: write_tiny_internlm2(root / fmt, fmt=fmt) for fmt in ("bin", "safetensors")}


@pytest.fixture(scope="module")
def model(ckpts):
    return InternLM.from_pretrained(ckpts["safetensors"])


@pytest.fixture(scope="module")
def hf(model):
    return hf_llama(model.config, model.state_dict())


def raw_pieces(folder):
    """What the test knows from the files alone: sentencepiece and the tokenizer config."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    added = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    named = {v["content"]: int(k) for k, v in added.items()}
    return sp, named


# -- the checkpoint ------------------------------------------------------------------------

def test_layout_is_upstream_internlm2(ckpts):
    for fmt, folder in ckpts.items():
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["model_type"] == "internlm2" and cfg["architectures"] == ["InternLM2ForCausalLM"]
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
                  "bias", "tie_word_embeddings", "vocab_size"):
            assert k in cfg, k
        assert "rotary" not in cfg
        index = json.loads((folder / f"{'model.safetensors' if fmt == 'safetensors' else 'pytorch_model.bin'}"
                            f".index.json").read_text())
        keys = set(index["weight_map"])
        assert len(set(index["weight_map"].values())) > 1  # sharded
        assert {"model.tok_embeddings.weight", "model.norm.weight", "output.weight",
                "model.layers.0.attention.wqkv.weight", "model.layers.1.attention.wo.weight",
                "model.layers.0.feed_forward.w1.weight", "model.layers.0.feed_forward.w3.weight",
                "model.layers.0.feed_forward.w2.weight", "model.layers.0.attention_norm.weight",
                "model.layers.0.ffn_norm.weight"} <= keys
        assert not any("q_proj" in k or "self_attn" in k or "embed_tokens" in k for k in keys)


def test_family_is_decided_by_config_json(ckpts, tmp_path):
    assert isinstance(config_from_json(ckpts["bin"] / "config.json"), InternLM2Config)
    v1 = InternLM.from_pretrained(write_tiny_internlm(tmp_path / "v1"))
    assert v1.config.family == "internlm" and "model.layers.0.self_attn.q_proj.weight" in v1.state_dict()


def test_both_formats_load_the_same_weights_and_state_dict_round_trips(ckpts, model):
    other = InternLM.from_pretrained(ckpts["bin"])
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in other.state_dict().items())
    on_disk = {k: v for _, shard in iter_shards(ckpts["safetensors"]) for k, v in shard.items()}
    assert sorted(sd) == sorted(on_disk) and all(torch.equal(sd[k], on_disk[k]) for k in sd)


def test_strict_loading_errors(ckpts, tmp_path):
    src = ckpts["safetensors"]
    index = json.loads((src / "model.safetensors.index.json").read_text())

    def edit(name, fn):
        folder = shutil.copytree(src, tmp_path / name)
        idx = json.loads((folder / "model.safetensors.index.json").read_text())
        key = "model.layers.1.attention.wqkv.weight"
        path = folder / idx["weight_map"][key]
        sd = safetensors.torch.load_file(str(path))
        new_key = fn(sd, key)
        safetensors.torch.save_file(sd, str(path))
        if new_key != key:
            idx["weight_map"].pop(key)
            if new_key:
                idx["weight_map"][new_key] = path.name
        (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
        return folder

    renamed = edit("renamed", lambda sd, k: (sd.__setitem__("model.layers.1.attention.wqkvv.weight", sd.pop(k)),
                                             "model.layers.1.attention.wqkvv.weight")[1])
    with pytest.raises(CheckpointError) as err:
        InternLM.from_pretrained(renamed)
    assert "wqkvv" in str(err.value) and "model.layers.1.attention.wqkv.weight" in str(err.value)

    def shrink(sd, k):
        sd[k] = sd[k][:-8].clone()
        return k
    with pytest.raises(CheckpointError, match=r"cannot split 'model.layers.1.attention.wqkv.weight'"):
        InternLM.from_pretrained(edit("short", shrink))

    def widen(sd, k):
        sd[k] = torch.cat([sd[k], sd[k][:, :1]], 1)
        return k
    with pytest.raises(CheckpointError, match="shape mismatch for 'model.layers.1.self_attn.q_proj.weight'"):
        InternLM.from_pretrained(edit("wide", widen))
    assert index  # the source folder is untouched
    InternLM.from_pretrained(src)


# -- the tokenizer -------------------------------------------------------------------------

def test_chat_tokens_come_from_tokenizer_config(ckpts, model):
    folder = ckpts["bin"]
    sp, named = raw_pieces(folder)
    tok = model.tokenizer
    for piece, name in INTERNLM2_CHAT_TOKENS.items():
        assert tok.chat_token_id(name) == named[name] == sp.piece_to_id(piece)
        assert tok.token_to_id(piece) == named[name]  # the model file's own name still resolves
        assert tok.encode(name, add_bos=False) == [named[name]]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    text = "<|im_start|>user\nhi there<|im_end|>\n"
    ids = tok.encode(text, add_bos=False)
    assert ids == [named["<|im_start|>"]] + sp.encode("user\nhi there") + [named["<|im_end|>"]] + sp.encode("\n")
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "user\nhi there\n"
    # without tokenizer_config.json the chat tokens are unknown, and chat says what is missing
    bare = load_tokenizer(folder / "tokenizer.model")
    with pytest.raises(ValueError, match="no <\\|im_end\\|> token.*tokenizer_config.json"):
        bare.chat_token_id("<|im_end|>")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        model.chat(bare, "hi", **GREEDY)


def test_bad_tokenizer_config(ckpts, tmp_path):
    folder = shutil.copytree(ckpts["bin"], tmp_path / "t")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["99999"] = {"content": "<|x|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="names token id 99999"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(folder)


def test_clean_up_follows_tokenizer_config(ckpts, tmp_path):
    tok = load_tokenizer(ckpts["bin"])
    ids = tok.encode("Hi , there .", add_bos=False)
    assert tok.decode(ids) == "Hi , there ."  # the published InternLM2 configs say false
    folder = shutil.copytree(ckpts["bin"], tmp_path / "c")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["clean_up_tokenization_spaces"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(folder).decode(ids) == "Hi, there."


# -- chatml --------------------------------------------------------------------------------

def expected_chatml(folder, turns, query, meta):
    sp, named = raw_pieces(folder)
    s, e = [named["<|im_start|>"]], [named["<|im_end|>"]]
    nl = sp.encode("\n")
    ids = [1]
    if meta:
        ids += s + sp.encode("system\n" + meta) + e + nl
    for q, r in turns:
        ids += s + sp.encode("user\n" + q) + e + nl + s + sp.encode("assistant\n" + r) + e + nl
    return ids + s + sp.encode("user\n" + query) + e + nl + s + sp.encode("assistant\n")


class Capture:
    """A transformers-style streamer: the first put() is the prompt, as upstream's chat sends it."""

    def __init__(self):
        self.calls = []

    def put(self, t):
        self.calls.append(t.tolist())

    def end(self):
        pass


@pytest.mark.parametrize("meta", ["default", "", "You are a tiny test model."])
def test_chat_builds_exact_chatml_ids_for_turns_1_and_2(ckpts, model, meta):
    kw = {} if meta == "default" else {"meta_instruction": meta}
    meta_text = INTERNLM2_META_INSTRUCTION if meta == "default" else meta
    cap = Capture()
    reply, history = model.chat(model.tokenizer, "你好", history=[], streamer=cap, **kw, **GREEDY)
    assert cap.calls[0] == [expected_chatml(ckpts["bin"], [], "你好", meta_text)]
    cap2 = Capture()
    model.chat(model.tokenizer, "请提供三个管理时间的建议。", history=history, streamer=cap2, **kw, **GREEDY)
    assert cap2.calls[0] == [expected_chatml(ckpts["bin"], [("你好", reply)], "请提供三个管理时间的建议。", meta_text)]
    assert history == [("你好", reply)]


def test_chat_defaults_and_stops_are_upstreams(model):
    tok = model.tokenizer
    cfg = model.chat_format.generation_config({})
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p) == (1024, True, 0.8, 0.8)
    assert cfg.stop_ids == [2, tok.chat_token_id("<|im_end|>")]
    assert model.chat_format.generation_config({"top_p": 0.5}).top_p == 0.5  # meta_instruction is chat()'s own argument


def test_chat_matches_transformers_generate(model, hf):
    tok = model.tokenizer
    stop = [2, tok.chat_token_id("<|im_end|>")]
    for query, history in [("hello there", []), ("and then?", [("hi", "ok")])]:
        ids, _ = build_chatml_ids(tok, query, history, model.context_window, 24)
        reset_hf_rope(hf)
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=24, eos_token_id=stop, pad_token_id=2)
        want = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        reply, _ = model.chat(tok, query, history=history, do_sample=False, max_new_tokens=24)
        assert reply == want


@pytest.mark.parametrize("beams", [1, 3])
def test_stream_chat_ends_with_chat_answer(model, beams):
    tok = model.tokenizer
    final = None
    for final in model.stream_chat(tok, "tell me", history=[("a", "b")], num_beams=beams, **GREEDY):
        pass
    assert final == model.chat(tok, "tell me", history=[("a", "b")], num_beams=beams, **GREEDY)


def test_sampling_chat_is_seeded(model):
    tok = model.tokenizer
    a = model.chat(tok, "hello", max_new_tokens=12, seed=3)[0]
    assert a == model.chat(tok, "hello", max_new_tokens=12, seed=3)[0]


# -- transformers-style generate -------------------------------------------------------------

def _padded(prompts, pad):
    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("kw", [dict(num_beams=1), dict(num_beams=3)])
def test_model_generate_returns_what_transformers_returns(model, hf, tmp_path, kw):
    prompts = [[1, 5, 6, 7, 8, 9], [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [1, 40]]
    ids, mask = _padded(prompts, 2)
    stop = [2, model.tokenizer.chat_token_id("<|im_end|>")]
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=stop, **kw)
    reset_hf_rope(hf)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=stop,
                         pad_token_id=2, **kw)
    assert ours.dtype == torch.long and torch.equal(ours, theirs)
    # InternLM v1 answers the same call
    v1 = InternLM.from_pretrained(write_tiny_internlm(tmp_path / "v1"))
    ids, mask = _padded(prompts, 0)
    got = v1.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kw)
    want = hf_twin(v1).generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=2,
                                pad_token_id=0, **kw)
    assert torch.equal(got, want)


def test_model_generate_bad_input(model):
    with pytest.raises(ValueError, match="LongTensor"):
        model.generate(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="pad on the left"):
        model.generate(torch.tensor([[1, 5, 2]]), attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model.generate(torch.tensor([[1, 5]]), attention_mask=torch.tensor([[1, 1, 1]]))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        model.generate(torch.tensor([[2, 2]]), attention_mask=torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="num_beams=0"):
        model.generate(torch.tensor([[1, 5]]), num_beams=0)


# -- overrides and bad input ------------------------------------------------------------------

def test_rope_and_context_overrides(ckpts):
    folder = ckpts["bin"]
    m = InternLM.from_pretrained(folder, max_context=2048)
    assert m.context_window == 2048 and m.config.rope_scaling == {"type": "dynamic", "factor": 2.0}
    assert InternLM.from_pretrained(folder, rope_scaling_factor=2.5).config.rope_scaling == {"type": "dynamic",
                                                                                            "factor": 2.5}
    assert InternLM.from_pretrained(folder, rope_scaling=None).config.rope_scaling is None
    lin = InternLM.from_pretrained(folder, rope_scaling={"type": "linear", "factor": 4.0})
    assert lin.config.rope_scaling_type == "linear"
    ids = torch.randint(3, 900, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(lin(ids), m(ids))
    long_prompt = [1] + torch.randint(3, 900, (700,), generator=torch.Generator().manual_seed(1)).tolist()
    assert len(m.generate(torch.tensor([long_prompt]), max_new_tokens=4)[0]) == 705  # past 512 positions
    with pytest.raises(ValueError, match="max_context=1 must be an integer >= 2"):
        InternLM.from_pretrained(folder, max_context=1)
    with pytest.raises(ValueError, match="rope_scaling_factor=0.5 must be a number >= 1"):
        InternLM.from_pretrained(folder, rope_scaling_factor=0.5)
    with pytest.raises(ValueError, match="rope_scaling="):
        InternLM.from_pretrained(folder, rope_scaling={"type": "yarn", "factor": 2.0})


def test_rope_overrides_refused_for_v1(tmp_path):
    with pytest.raises(ValueError, match="apply to InternLM2 checkpoints"):
        InternLM.from_pretrained(write_tiny_internlm(tmp_path / "v1"), rope_scaling_factor=2.0)


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
    with pytest.raises(TypeError, match="meta_instruction must be a string"):
        model.chat(tok, "hi", meta_instruction=3, **GREEDY)
    for opt, value in (("num_beams", 0), ("temperature", -1), ("top_p", 1.5), ("max_new_tokens", 0)):
        with pytest.raises(ValueError, match=f"{opt}={value}"):
            model.chat(tok, "hi", **{opt: value})
    with pytest.raises(ValueError, match="unknown generation option"):
        model.chat(tok, "hi", temprature=0.5)
    assert model.chat(tok, "hi", **GREEDY)[0] == model.chat(tok, "hi", **GREEDY)[0]


def test_history_overflow_drops_oldest_turns(model):
    tok = model.tokenizer
    long_turn = ("tell me a story " * 30, "once upon a time " * 30)
    history = [long_turn] * 6 + [("recent", "turn")]
    ids, dropped = build_chatml_ids(tok, "next", history, model.context_window, 64)
    assert 0 < dropped < len(history) and len(ids) + 64 <= model.context_window
    text = tok.decode(ids, skip_special_tokens=False)
    assert "recent" in text and text.startswith("<s><|im_start|>system\n")  # the system block is kept
    reply, new_history = model.chat(tok, "next", history=history, do_sample=False, max_new_tokens=8)
    assert new_history[:-1] == history
