"""InternLM / InternLM-XComposer tokenizer on top of a real sentencepiece model.

The checkpoints ship a sentencepiece ``tokenizer.model``. We drive it with the
``sentencepiece`` package directly (no ``trust_remote_code``) and add the two
things sentencepiece does not do for us:

* special pieces written literally in text (``<s>``, ``<eoh>``,
  ``<TOKENS_UNUSED_0>``, ``<ImageHere>`` ...) become their single id, even when
  the model marks them CONTROL (which sentencepiece never matches in text);
* the chat separators are resolved by piece name, so the public 103168-piece
  vocabulary and tiny test vocabularies work the same way.

``train_tiny_tokenizer`` writes a small real-format model for tests and demos.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

__all__ = [
    "InternLMTokenizer",
    "IncrementalDecoder",
    "load_tokenizer",
    "train_tiny_tokenizer",
    "apply_tokenizer_config",
    "clean_up_tokenization",
    "TOKENIZER_FILE",
    "check_text",
    "TOKENIZER_CONFIG_FILE",
]

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def check_text(text, what: str = "the text") -> str:
    """`text` if it is a str of valid Unicode, else a TypeError/ValueError that says what is wrong.

    A lone surrogate (e.g. "\\ud800", from a JSON escape or a bad decode) is a str Python accepts but
    no UTF-8 encoder does; sentencepiece would fail on it with an unhelpful C++ cast error."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a string, got {type(text).__name__}; decode bytes first")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise ValueError(f"{what} is not valid Unicode: it holds a lone surrogate U+{ord(bad):04X} at character "
                         f"{e.start}; remove it, or decode the input bytes with errors='replace'") from None
    return text

# InternLM-chat names first, then the names the XComposer vocabulary uses for
# the same slots (upstream reaches them as ids 103027 / 103028).
_EOH_NAMES = ("<eoh>", "<TOKENS_UNUSED_0>")
_EOA_NAMES = ("<eoa>", "<TOKENS_UNUSED_1>")

# A NormalizerSpec (ModelProto field 3) holding only add_dummy_prefix=false
# (field 3) and remove_extra_whitespaces=false (field 4). Protobuf merges a
# repeated singular message field into the earlier one, so appending these
# bytes to a serialized model overrides just those two flags.
_NO_DUMMY_PREFIX = bytes([0x1A, 0x04, 0x18, 0x00, 0x20, 0x00])

_LFS_MAGIC = b"version https://git-lfs"

# SentencePiece.Type values (sentencepiece_model.proto): NORMAL=1, UNKNOWN=2,
# CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6. UNUSED is left out on purpose:
# such pieces can be ordinary text that a vocabulary restriction switched off.
_SPECIAL_TYPES = frozenset({2, 3, 4})


class InternLMTokenizer:
    """Sentencepiece tokenizer with InternLM's special-piece handling.

    Ids: ``bos``/``eos``/``unk`` come from the model; ``pad_token_id`` is the
    model's pad piece if it defines one, else ``unk_token_id`` (InternLM
    configs use ``pad_token_id=0`` = ``<unk>``; padding is masked anyway).

    Special pieces are every CONTROL, UNKNOWN and USER_DEFINED piece of the
    model plus the eoh/eoa pieces. ``encode`` splits text on them (longest
    match first), encodes the plain segments with sentencepiece and inserts
    the special ids. Sentencepiece's dummy prefix ("▁" prepended to the input)
    is applied only to a segment that starts the text (nothing but ``<s>``
    before it); segments after a special piece are encoded without it, so
    ``"<eoh>\\n<|Bot|>:"`` does not gain a space. ``decode`` mirrors that rule,
    so ``decode(encode(x, add_bos=False), skip_special_tokens=False) == x``.

    Unavoidable normalisation: whatever the model's own normalizer does
    (NFKC for models trained with it, collapsed spaces for models with
    ``remove_extra_whitespaces``) and characters that map to ``<unk>`` in a
    model without byte fallback are not restored. Models with identity
    normalisation and byte fallback (``train_tiny_tokenizer``'s) round-trip
    ordinary text exactly; for plain text the ids equal sentencepiece's own.
    One deliberate difference from sentencepiece's inline matching of
    USER_DEFINED pieces: text that *starts* with a special piece gets no lone
    "▁" piece in front of it.
    """

    def __init__(self, model_file: str | Path) -> None:
        path = Path(model_file)
        if path.is_dir():
            raise ValueError(
                f"{path} is a folder, not a sentencepiece model; use "
                f"load_tokenizer({str(path)!r}) or pass {path / TOKENIZER_FILE}"
            )
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {path}; pass the path of the "
                f"sentencepiece {TOKENIZER_FILE} shipped with the checkpoint"
            )
        blob = path.read_bytes()
        self.model_file = path
        self._sp = _load_proto(blob, path)
        # Second view of the same model without the dummy prefix, for text
        # that continues after a special piece.
        self._sp_cont = _load_proto(blob + _NO_DUMMY_PREFIX, path)

        sp = self._sp
        n = sp.get_piece_size()
        self._pieces = [sp.id_to_piece(i) for i in range(n)]
        self._piece_to_id = {p: i for i, p in enumerate(self._pieces)}
        types = _piece_types(blob)
        if len(types) != n:  # our reader and sentencepiece disagree: trust neither
            raise ValueError(f"{path}: read {len(types)} piece types for {n} pieces; the file is damaged")
        special = {i for i, t in enumerate(types) if t in _SPECIAL_TYPES}
        # The chat slots count as special even if a vocabulary stores them as
        # NORMAL pieces, which sentencepiece would otherwise spell out.
        special.update(self._piece_to_id[p] for p in _EOH_NAMES + _EOA_NAMES if p in self._piece_to_id)
        self._special_ids = frozenset(special)
        self._special_by_piece = {self._pieces[i]: i for i in special if self._pieces[i]}
        alternatives = sorted(self._special_by_piece, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    # ----------------------------------------------------------------- ids

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)

    @property
    def bos_token_id(self) -> int:
        return self._required_id(self._sp.bos_id(), "bos")

    @property
    def eos_token_id(self) -> int:
        return self._required_id(self._sp.eos_id(), "eos")

    @property
    def unk_token_id(self) -> int:
        return self._required_id(self._sp.unk_id(), "unk")

    @property
    def pad_token_id(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.unk_token_id

    @property
    def bos_token(self) -> str:
        return self._pieces[self.bos_token_id]

    @property
    def eos_token(self) -> str:
        return self._pieces[self.eos_token_id]

    @property
    def eoh(self) -> str:
        """End-of-human piece text, e.g. for f"<|User|>:{q}{tok.eoh}\\n<|Bot|>:"."""
        return self._chat_piece(_EOH_NAMES, "eoh")

    @property
    def eoa(self) -> str:
        """End-of-assistant piece text; generation stops on it."""
        return self._chat_piece(_EOA_NAMES, "eoa")

    @property
    def eoh_token_id(self) -> int:
        return self._piece_to_id[self.eoh]

    @property
    def eoa_token_id(self) -> int:
        return self._piece_to_id[self.eoa]

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every piece that ``encode`` matches literally, with its id."""
        return dict(self._special_by_piece)

    def token_to_id(self, piece: str) -> int | None:
        return self._piece_to_id.get(piece)

    def id_to_token(self, token_id: int) -> str:
        return self._pieces[self._check_id(token_id)]

    def _required_id(self, token_id: int, name: str) -> int:
        if token_id < 0:
            raise ValueError(
                f"{self.model_file} defines no {name} piece; retrain it with "
                f"{name}_id set (InternLM uses unk=0, bos=1, eos=2)"
            )
        return token_id

    def _chat_piece(self, names: tuple[str, ...], role: str) -> str:
        for name in names:
            if name in self._piece_to_id:
                return name
        raise ValueError(
            f"{self.model_file} has no {role} piece: looked for "
            f"{' or '.join(names)}. Chat prompts need it; use the checkpoint's own "
            f"tokenizer.model or train one with user_defined_symbols={list(names[:1])}"
        )

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(
                f"token id {token_id} is outside the vocabulary of {self.model_file} "
                f"(size {len(self._pieces)}); the ids come from a different tokenizer"
            )
        return token_id

    # ------------------------------------------------------------- encode

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Text to ids; special pieces written in ``text`` become single ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}; decode bytes first")
        check_text(text, "the text to encode")
        ids = [self.bos_token_id] if add_bos else []
        bos = self._sp.bos_id()
        at_start, pos = True, 0
        matches = self._special_re.finditer(text) if self._special_re is not None else ()
        for m in matches:
            if m.start() > pos:
                ids += self._encode_plain(text[pos : m.start()], at_start)
                at_start = False
            special_id = self._special_by_piece[m.group()]
            ids.append(special_id)
            at_start = at_start and special_id == bos
            pos = m.end()
        if pos < len(text):
            ids += self._encode_plain(text[pos:], at_start)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def _encode_plain(self, text: str, at_start: bool) -> list[int]:
        return (self._sp if at_start else self._sp_cont).encode(text)

    # ------------------------------------------------------------- decode

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids to text. Specials are dropped, or written as their piece text."""
        text = self._decode(_as_list(ids), skip_special_tokens, at_start=True)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for on its own (OpenAI's logprob `bytes`): a byte-fallback
        piece `<0xE4>` is that one byte, `▁` is a space, a special token its piece text."""
        token_id = self._check_id(token_id)
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])
        if token_id in self._special_ids:
            return piece.encode("utf-8")
        return piece.replace("\u2581", " ").encode("utf-8")

    def _decode(self, ids: Sequence[int], skip_special_tokens: bool, at_start: bool) -> str:
        # at_start: nothing but <s> precedes ids[0] in the full sequence, so
        # the first plain run carries encode's dummy prefix.
        bos = self._sp.bos_id()
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = self._check_id(token_id)
            if token_id not in self._special_ids:
                run.append(token_id)
                continue
            if run:
                parts.append(self._decode_plain(run, at_start))
                run = []
                at_start = False
            at_start = at_start and token_id == bos
            if not skip_special_tokens:
                parts.append(self._pieces[token_id])
        if run:
            parts.append(self._decode_plain(run, at_start))
        return "".join(parts)

    def _decode_plain(self, ids: list[int], at_start: bool) -> str:
        return (self._sp if at_start else self._sp_cont).decode(ids)

    def __repr__(self) -> str:
        return f"InternLMTokenizer({str(self.model_file)!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------- added tokens (InternLM2)

    #: transformers' clean-up of spaces before punctuation on decode, as tokenizer_config.json's
    #: `clean_up_tokenization_spaces` says (InternLM2's published configs say false)
    clean_up_tokenization_spaces = False

    def add_named_tokens(self, tokens: dict[int, str], source: str = "tokenizer_config.json") -> None:
        """Name existing ids by new texts, as `added_tokens_decoder` does in a tokenizer_config.json.

        InternLM2's model file holds `[UNUSED_TOKEN_141..146]` pieces that its tokenizer config
        names `<|plugin|>` .. `<|im_start|>`. Each named id becomes special: `encode` matches its
        text literally (the text around it is encoded span by span), `decode` writes the name (or
        drops it with `skip_special_tokens`), and `token_to_id` finds it under both names.
        """
        for token_id, text in tokens.items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"{source}: added token {token_id} has no text ({text!r})")
            if not (isinstance(token_id, int) and 0 <= token_id < len(self._pieces)):
                raise ValueError(f"{source} names token id {token_id} ({text!r}) but {self.model_file} has "
                                 f"{len(self._pieces)} pieces: the files come from different checkpoints")
        special = set(self._special_ids)
        for token_id, text in tokens.items():
            if self._pieces[token_id] == text:
                special.add(token_id)
                continue
            self._pieces[token_id] = text
            self._piece_to_id[text] = token_id
            special.add(token_id)
        self._special_ids = frozenset(special)
        self._special_by_piece = {self._pieces[i]: i for i in special if self._pieces[i]}
        alternatives = sorted(self._special_by_piece, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def chat_token_id(self, text: str) -> int:
        """The id of a named chat token such as "<|im_end|>"; an error naming the fix if absent."""
        token_id = self._piece_to_id.get(text)
        if token_id is None or token_id not in self._special_ids:
            raise ValueError(f"{self.model_file} has no {text} token: InternLM2 names it in "
                             f"{TOKENIZER_CONFIG_FILE} (added_tokens_decoder); put the checkpoint's "
                             f"{TOKENIZER_CONFIG_FILE} next to {TOKENIZER_FILE}")
        return token_id


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`: no space before . ? ! , and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def apply_tokenizer_config(tokenizer: InternLMTokenizer, path: str | Path) -> InternLMTokenizer:
    """Read `added_tokens_decoder` and `clean_up_tokenization_spaces` from a tokenizer_config.json."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download {TOKENIZER_CONFIG_FILE}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds {type(cfg).__name__}, not a JSON object; re-download it")
    added = cfg.get("added_tokens_decoder") or {}
    tokens = {}
    for key, entry in added.items():
        text = entry.get("content") if isinstance(entry, dict) else entry
        try:
            tokens[int(key)] = text
        except ValueError:
            raise ValueError(f"{path}: added_tokens_decoder key {key!r} is not a token id") from None
    tokenizer.add_named_tokens(tokens, str(path))
    tokenizer.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
    return tokenizer


def _as_list(ids: Iterable[int]) -> list[int]:
    if hasattr(ids, "tolist"):  # torch / numpy: one conversion, not one per element
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return list(ids)


def _load_proto(blob: bytes, path: Path) -> spm.SentencePieceProcessor:
    if blob.startswith(_LFS_MAGIC):
        raise ValueError(
            f"{path} is a Git LFS pointer, not a sentencepiece model; run "
            f"`git lfs pull` in the checkpoint folder or download the file again"
        )
    problem = "empty file" if not blob else ""
    if not problem:
        try:
            sp = spm.SentencePieceProcessor(model_proto=blob)
        except RuntimeError as e:
            problem = f"sentencepiece could not parse it: {str(e).strip()}"
        else:
            if sp.get_piece_size() > 0:
                return sp
            problem = "it holds no pieces"
    raise ValueError(
        f"{path} is not a sentencepiece model ({len(blob)} bytes; {problem}); "
        f"it is truncated or a different file: download {TOKENIZER_FILE} again"
    )


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _skip(buf: bytes, pos: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        size, pos = _varint(buf, pos)
        return pos + size
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported protobuf wire type {wire}")


def _piece_types(blob: bytes) -> list[int]:
    """Type of every piece, read from the serialized ModelProto.

    The sentencepiece Python API exposes is_control/is_unknown/is_byte but not
    USER_DEFINED, and protobuf is not a runtime dependency, so we walk the
    wire format: ModelProto field 1 = repeated SentencePiece, whose field 3
    is the type enum (absent means NORMAL).
    """
    types: list[int] = []
    pos, end = 0, len(blob)
    while pos < end:
        key, pos = _varint(blob, pos)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 2:
            size, pos = _varint(blob, pos)
            sub, stop, kind = pos, pos + size, 1
            while sub < stop:
                k, sub = _varint(blob, sub)
                if k == (3 << 3):  # field 3, varint
                    kind, sub = _varint(blob, sub)
                else:
                    sub = _skip(blob, sub, k & 7)
            types.append(kind)
            pos = stop
        else:
            pos = _skip(blob, pos, wire)
    return types


def load_tokenizer(path: str | Path) -> InternLMTokenizer:
    """Load from a checkpoint folder holding ``tokenizer.model``, or the file itself."""
    path = Path(path)
    if path.is_dir():
        model_file = path / TOKENIZER_FILE
        if not model_file.is_file():
            raise FileNotFoundError(
                f"no {TOKENIZER_FILE} in folder {path} (looked for {model_file}); "
                f"copy the checkpoint's sentencepiece model there or pass the file's path"
            )
        tok = InternLMTokenizer(model_file)
        if (path / TOKENIZER_CONFIG_FILE).is_file():  # InternLM2 names its chat tokens there
            apply_tokenizer_config(tok, path / TOKENIZER_CONFIG_FILE)
        return tok
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer path not found: {path}; pass a checkpoint folder containing "
            f"{TOKENIZER_FILE} or the {TOKENIZER_FILE} file (download the checkpoint first)"
        )
    return InternLMTokenizer(path)


class IncrementalDecoder:
    """Streaming detokenizer: feed generated ids, get the text that is final.

    Keeps two offsets into the ids seen so far: text before ``read`` has been
    returned, and ``prefix`` is where the re-decoded window starts (one chunk
    earlier, so sentencepiece sees the context that decides spaces). Text is
    held back while it ends in U+FFFD, i.e. inside a byte-fallback character.
    Each step decodes only the window, so the cost is amortised O(new ids).
    ``"".join(pushes) + flush() == tokenizer.decode(all_ids, skip)``.
    """

    def __init__(self, tokenizer: InternLMTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        # Whether only <s> lies before the window: decode's dummy-prefix rule
        # depends on it, and the window must be decoded in the same context.
        self._at_start = True

    def push(self, ids: Iterable[int] | int) -> str:
        """Add ids; return the text they complete (possibly "")."""
        self._ids.extend(_as_list(ids))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is held back (call once generation has ended)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        dec = self.tokenizer._decode
        window = self._ids[self._prefix :]
        done = dec(window[: self._read - self._prefix], self.skip_special_tokens, self._at_start)
        text = dec(window, self.skip_special_tokens, self._at_start)
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        bos = self.tokenizer._sp.bos_id()
        self._at_start = self._at_start and all(
            i == bos for i in self._ids[self._prefix : self._read]
        )
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]


# ------------------------------------------------------------- tiny models


def _tiny_corpus() -> list[str]:
    """A few hundred deterministic multilingual lines for training test models."""
    subjects = ["The cat", "A small dog", "My friend", "This model", "The old man",
                "Our team", "She", "He", "They", "We", "Every student", "The artist"]
    verbs = ["writes", "reads", "draws", "describes", "finds", "opens", "likes",
             "builds", "sees", "paints", "explains", "shares"]
    objects = ["a short article", "the picture", "an image of the sea",
               "three red apples", "the city at night", "a long letter",
               "the mountain road", "two blue birds", "a quiet garden",
               "the history of Rome", "an old photo", "the morning news"]
    endings = [".", "!", "?", ", and then rests.", " every day.", " with great care."]
    zh = ["今天天气很好", "我们一起去公园散步", "这张图片里有一只猫", "请描述这幅画",
          "模型可以写文章", "山上的风景非常美丽", "他正在读一本书", "城市的夜晚灯火通明",
          "小狗在草地上奔跑", "我喜欢喝茶", "这是一个好问题", "谢谢你的帮助",
          "大海是蓝色的", "孩子们在学校学习", "春天来了花都开了", "请给我讲一个故事"]
    emoji = ["😀", "🎉", "👍", "🐱", "🌊", "❤️", "👨‍👩‍👧", "🇨🇳", "🇺🇸", "✨", "🚀", "☕"]
    lines: list[str] = []
    for i in range(240):
        lines.append(f"{subjects[i % 12]} {verbs[(i * 5) % 12]} "
                     f"{objects[(i * 7) % 12]}{endings[i % 6]}")
        lines.append(f"{zh[i % 16]}，{zh[(i * 3 + 1) % 16]}。")
        lines.append(f"In {1900 + i} there were {i * 37 % 1000} people ({i * 3.14:.2f}% more).")
        if i % 4 == 0:
            e = i // 4
            lines.append(f"{emoji[e % 12]} {subjects[e % 12].lower()} "
                         f"{emoji[(e + 5) % 12]} 中文{zh[e % 16]}")
            lines.append(f"<|User|>:{objects[i % 12]}?\n"
                         f"<|Bot|>:{subjects[(i + 1) % 12]} {verbs[i % 12]} it.")
            lines.append(f"def f_{i}(x):\n    return x * {i} + 1  # note\n\tdone")
    return lines


def train_tiny_tokenizer(
    out_path: str | Path,
    vocab_size: int = 1000,
    extra_pieces: Sequence[str] = (),
    xcomposer_names: bool = False,
    chat_pieces: Sequence[str] | None = None,
    add_dummy_prefix: bool = True,
) -> Path:
    """Train a small real sentencepiece BPE model shaped like InternLM's.

    unk=0, bos=1 (``<s>``), eos=2 (``</s>``), then the chat pieces as
    user-defined symbols (``<eoh>``/``<eoa>``, or ``<TOKENS_UNUSED_0>``/
    ``<TOKENS_UNUSED_1>`` with ``xcomposer_names``), then ``extra_pieces``.
    Identity normalisation, no whitespace collapsing and byte fallback make
    every string round-trip. Single-threaded, so the bytes are deterministic.
    ``out_path`` is a ``*.model`` file or a folder (gets ``tokenizer.model``).
    Returns the written file. ``chat_pieces`` replaces the chat pieces (InternLM2's model file
    holds ``[UNUSED_TOKEN_141..146]`` there); ``add_dummy_prefix=False`` as InternLM2's has.
    """
    out = Path(out_path)
    if out.suffix != ".model":
        out = out / TOKENIZER_FILE
    chat = ["<TOKENS_UNUSED_0>", "<TOKENS_UNUSED_1>"] if xcomposer_names else ["<eoh>", "<eoa>"]
    if chat_pieces is not None:
        chat = list(chat_pieces)
    symbols = list(dict.fromkeys(chat + list(extra_pieces)))
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_tiny_corpus()),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            user_defined_symbols=symbols,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=add_dummy_prefix,
            normalization_rule_name="identity",
            num_threads=1,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"training a tiny tokenizer with vocab_size={vocab_size} failed: {str(e).strip()}; "
            f"the built-in corpus supports roughly 450 to 1200 pieces"
        ) from e
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return out
