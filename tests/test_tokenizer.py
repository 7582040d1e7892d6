"""Tokenizer tests on tiny real sentencepiece models trained on the fly."""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from xcomposer.llm.tokenizer import (
    IncrementalDecoder,
    InternLMTokenizer,
    _piece_types,
    _tiny_corpus,
    load_tokenizer,
    train_tiny_tokenizer,
)

PLAIN_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "今天天气很好，我们一起去公园散步。",
    "生僻字：龘靐齉",  # not in the tiny corpus: byte fallback
    "😀🎉👍",
    "family 👨‍👩‍👧‍👦 and flags 🇨🇳🇺🇸🇯🇵, skin tone 👍🏽",
    "mixed 中文 and English 123 😀!",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    spaces   inside",
    "line one\nline two\n\nline four\n",
    "\n\nstarts with newlines",
    "\ttabs\tand\r\nCRLF",
    " ",
    "\n",
    "",
    "digits 3.14159 and 2024-01-01",
    "<not special> <|User|>: looks like a tag",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(folder, extra_pieces=["<ImageHere>"])
    return folder


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> InternLMTokenizer:
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def xc_tok(tmp_path_factory: pytest.TempPathFactory) -> InternLMTokenizer:
    path = train_tiny_tokenizer(tmp_path_factory.mktemp("xc") / "tokenizer.model", xcomposer_names=True)
    return InternLMTokenizer(path)


@pytest.fixture(scope="module")
def bare_tok(tmp_path_factory: pytest.TempPathFactory) -> InternLMTokenizer:
    """A model with no chat pieces at all, trained with sentencepiece directly."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus()), model_writer=buf, model_type="bpe",
        vocab_size=800, byte_fallback=True, character_coverage=1.0, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("bare") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return InternLMTokenizer(path)


# ------------------------------------------------------------------ training


def test_train_layout_matches_internlm(tok: InternLMTokenizer) -> None:
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.id_to_token(0), tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert tok.vocab_size == len(tok) == 1000
    assert tok.token_to_id("<eoh>") == 3 and tok.token_to_id("<eoa>") == 4
    assert tok.token_to_id("<ImageHere>") == 5
    assert tok.pad_token_id == tok.unk_token_id  # no pad piece: documented fallback
    # byte fallback pieces exist, so no character can become <unk>
    assert tok.token_to_id("<0xE4>") is not None


def test_train_is_deterministic_and_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    a = train_tiny_tokenizer(tmp_path / "a" / "tokenizer.model", extra_pieces=["<x>"])
    elapsed = time.perf_counter() - start
    b = train_tiny_tokenizer(tmp_path / "b", extra_pieces=["<x>"])
    assert a.name == b.name == "tokenizer.model" and b.parent == tmp_path / "b"
    assert a.read_bytes() == b.read_bytes()
    assert elapsed < 2.0
    other = train_tiny_tokenizer(tmp_path / "c", extra_pieces=["<y>"])
    assert other.read_bytes() != a.read_bytes()


def test_train_rejects_impossible_vocab_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=50"):
        train_tiny_tokenizer(tmp_path, vocab_size=50)


def test_piece_type_reader_matches_protobuf(model_dir: Path) -> None:
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    blob = (model_dir / "tokenizer.model").read_bytes()
    proto = pb.ModelProto()
    proto.ParseFromString(blob)
    assert _piece_types(blob) == [p.type for p in proto.pieces]
    assert proto.normalizer_spec.add_dummy_prefix  # like InternLM: segments get "▁"
    assert not proto.normalizer_spec.remove_extra_whitespaces


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_plain_round_trip(tok: InternLMTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids[:1] == [tok.bos_token_id]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tok.decode(tok.encode(text, add_bos=False), skip_special_tokens=False) == text
    assert tok.unk_token_id not in ids


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_plain_text_matches_sentencepiece(tok: InternLMTokenizer, model_dir: Path, text: str) -> None:
    # Without specials we must tokenize exactly like the library itself.
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_empty_string(tok: InternLMTokenizer) -> None:
    assert tok.encode("", add_bos=False) == []
    assert tok.encode("") == [tok.bos_token_id]
    assert tok.decode([]) == ""


# ------------------------------------------------------------------ specials

SPECIAL_TEXTS = [
    "<eoh>",
    "<eoh>\n<|Bot|>:",
    " <|User|>:hi there\n<eoh> <|Bot|>: fine<eoa>\n <|User|>:again<eoh>",
    "<ImageHere>describe  this<ImageHere>\n",
    "a<eoh><eoa>b",
    "<s> starts with a literal bos</s>",
    "<eoh>  two spaces after",
    "<eoa>中文😀",
    "<unk> literal",
]


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_special_round_trip(tok: InternLMTokenizer, text: str) -> None:
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    stripped = text
    for piece in ("<s>", "</s>", "<eoh>", "<eoa>", "<ImageHere>", "<unk>"):
        stripped = stripped.replace(piece, "")
    assert tok.decode(ids) == stripped


def test_specials_become_single_ids(tok: InternLMTokenizer) -> None:
    ids = tok.encode(" <|User|>:hi<eoh>\n<|Bot|>:ok<eoa>", add_bos=False)
    assert ids.count(tok.eoh_token_id) == 1 and ids.count(tok.eoa_token_id) == 1
    assert ids[-1] == tok.eoa_token_id
    # CONTROL pieces are never matched by sentencepiece itself; we match them.
    assert tok.encode("</s><s>", add_bos=False) == [tok.eos_token_id, tok.bos_token_id]
    assert len(tok._sp.encode("</s>")) > 1
    assert tok.encode("<ImageHere>", add_bos=False) == [tok.token_to_id("<ImageHere>")]
    assert tok.special_tokens["<eoh>"] == tok.eoh_token_id


def test_segment_after_special_gets_no_dummy_space(tok: InternLMTokenizer) -> None:
    ids = tok.encode("<eoh>\n<|Bot|>:", add_bos=False)
    assert ids[0] == tok.eoh_token_id
    assert not tok.id_to_token(ids[1]).startswith("▁")
    assert tok.decode(ids[1:]) == "\n<|Bot|>:"
    # a real space after the special is kept, exactly once
    ids = tok.encode("<eoh> <|Bot|>:", add_bos=False)
    assert tok.decode(ids, skip_special_tokens=False) == "<eoh> <|Bot|>:"
    assert "".join(tok.id_to_token(i) for i in ids[1:]).startswith("▁<")
    assert not "".join(tok.id_to_token(i) for i in ids[1:]).startswith("▁▁")


def test_longest_special_wins(tmp_path: Path) -> None:
    # "<img>" is a prefix of "<img></img>": the longer piece must win
    t = InternLMTokenizer(train_tiny_tokenizer(tmp_path, extra_pieces=["<img>", "<img></img>"]))
    ids = t.encode("<img></img><img>", add_bos=False)
    assert ids == [t.token_to_id("<img></img>"), t.token_to_id("<img>")]


def test_add_bos_and_eos(tok: InternLMTokenizer) -> None:
    assert tok.encode("hi")[0] == tok.bos_token_id
    assert tok.bos_token_id not in tok.encode("hi", add_bos=False)
    ids = tok.encode("hi", add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_decode_skip_special_tokens(tok: InternLMTokenizer) -> None:
    ids = [tok.bos_token_id, *tok.encode("Hi", add_bos=False), tok.eoh_token_id,
           tok.unk_token_id, tok.token_to_id("<ImageHere>"), tok.eoa_token_id, tok.eos_token_id]
    assert tok.decode(ids) == "Hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>Hi<eoh><unk><ImageHere><eoa></s>"
    assert tok.decode(torch.tensor(ids)) == "Hi"


def test_chat_prompt_with_resolved_pieces(tok: InternLMTokenizer) -> None:
    assert (tok.eoh, tok.eoa) == ("<eoh>", "<eoa>")
    prompt = f"<|User|>:what is this?{tok.eoh}\n<|Bot|>:"
    ids = tok.encode(prompt)
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + prompt
    assert ids.index(tok.eoh_token_id) < len(ids) - 1


def test_xcomposer_names_resolve_same_slots(xc_tok: InternLMTokenizer) -> None:
    assert xc_tok.token_to_id("<eoh>") is None
    assert (xc_tok.eoh, xc_tok.eoa) == ("<TOKENS_UNUSED_0>", "<TOKENS_UNUSED_1>")
    assert (xc_tok.eoh_token_id, xc_tok.eoa_token_id) == (3, 4)
    prompt = f" <|User|>:hi\n{xc_tok.eoh} <|Bot|>:hello{xc_tok.eoa}"
    ids = xc_tok.encode(prompt, add_bos=False)
    assert xc_tok.eoh_token_id in ids and ids[-1] == xc_tok.eoa_token_id
    assert xc_tok.decode(ids, skip_special_tokens=False) == prompt
    assert xc_tok.decode(ids) == " <|User|>:hi\n <|Bot|>:hello"


def test_missing_chat_piece_errors_only_when_used(bare_tok: InternLMTokenizer) -> None:
    assert bare_tok.decode(bare_tok.encode("plain text works")) == "plain text works"
    with pytest.raises(ValueError, match=r"<eoh> or <TOKENS_UNUSED_0>"):
        bare_tok.eoh_token_id
    with pytest.raises(ValueError, match=r"<eoa> or <TOKENS_UNUSED_1>"):
        bare_tok.eoa


def test_piece_lookup(tok: InternLMTokenizer) -> None:
    assert tok.token_to_id("<no such piece>") is None
    assert tok.id_to_token(tok.eoa_token_id) == "<eoa>"
    for i in (0, 7, 500, len(tok) - 1):
        assert tok.token_to_id(tok.id_to_token(i)) == i
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_token(len(tok))
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([5, -1])
    with pytest.raises(TypeError, match="expects str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# -------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"\x00garbage\xff" * 10, "not a sentencepiece model"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n", "git lfs pull"),
    ],
)
def test_bad_model_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        InternLMTokenizer(path)
    assert str(path) in str(info.value)


def test_truncated_model_file(tmp_path: Path, model_dir: Path) -> None:
    blob = (model_dir / "tokenizer.model").read_bytes()
    path = tmp_path / "tokenizer.model"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="download tokenizer.model again") as info:
        load_tokenizer(tmp_path)
    assert str(path) in str(info.value)


def test_load_paths(model_dir: Path, tmp_path: Path) -> None:
    from_folder = load_tokenizer(model_dir)
    from_file = load_tokenizer(str(model_dir / "tokenizer.model"))
    assert from_folder.encode("same 中文") == from_file.encode("same 中文")
    with pytest.raises(FileNotFoundError, match="tokenizer path not found") as info:
        load_tokenizer(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    with pytest.raises(FileNotFoundError, match="no tokenizer.model in folder"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        InternLMTokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="is a folder"):
        InternLMTokenizer(model_dir)


# --------------------------------------------------------- IncrementalDecoder

STREAM_TEXTS = [
    "今天天气很好，生僻字龘靐齉也可以。",
    "emoji 👨‍👩‍👧‍👦 🇨🇳🇺🇸 👍🏽 ok",
    "Hello world,\n  indented line\n",
    " <|User|>:hi<eoh>\n<|Bot|>:你好😀<eoa>",
    "<s>bos in the middle <s> again</s>",
]


def _stream(tok: InternLMTokenizer, ids: list[int], skip: bool, chunks: list[int]) -> list[str]:
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    out, pos = [], 0
    for size in chunks:
        out.append(dec.push(ids[pos : pos + size]))
        pos += size
    out.append(dec.push(ids[pos:]))
    out.append(dec.flush())
    return out


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_one_id_at_a_time(tok: InternLMTokenizer, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    pieces = _stream(tok, ids, skip, [1] * len(ids))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-1] == ""  # valid text: nothing left for flush
    assert sum(bool(p) for p in pieces) > 1  # it really streamed


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_random_chunks(tok: InternLMTokenizer, text: str) -> None:
    ids = tok.encode(text, add_bos=False)
    rng = random.Random(0)
    for _ in range(5):
        chunks, left = [], len(ids)
        while left > 0:
            chunks.append(min(left, rng.randint(0, 4)))
            left -= chunks[-1]
        pieces = _stream(tok, ids, False, chunks)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False) == text


def test_stream_single_int_push(tok: InternLMTokenizer) -> None:
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push(i) for i in tok.encode("ok 好")) + dec.flush()
    assert text == "ok 好"


def test_stream_ending_inside_a_character(tok: InternLMTokenizer) -> None:
    ids = tok.encode("ab龘", add_bos=False)
    assert [tok.id_to_token(i) for i in ids[-3:]] == ["<0xE9>", "<0xBE>", "<0x98>"]
    cut = ids[:-1]  # generation stopped after 2 of the 3 bytes
    dec = IncrementalDecoder(tok)
    pushed = "".join(dec.push([i]) for i in cut)
    assert pushed == "ab"  # the half character is held back
    rest = dec.flush()
    assert "\ufffd" in rest
    assert pushed + rest == tok.decode(cut)
    assert dec.flush() == ""


def test_stream_cost_is_linear(tok: InternLMTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = 0
    original = tok._decode

    def counting(ids, skip, at_start):  # type: ignore[no-untyped-def]
        nonlocal decoded
        decoded += len(ids)
        return original(ids, skip, at_start)

    monkeypatch.setattr(tok, "_decode", counting)
    ids = tok.encode("The cat reads a short article. 今天天气很好！ " * 40)
    dec = IncrementalDecoder(tok)
    out = "".join(dec.push([i]) for i in ids) + dec.flush()
    monkeypatch.undo()
    assert out == tok.decode(ids)
    assert decoded < 10 * len(ids)  # re-decoding everything would be ~len(ids)**2
