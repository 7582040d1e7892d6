"""Each checkpoint variant and revision is prompted as its own upstream remote code prompts it
(docs/checkpoint-format.md, "Variants and revisions"): the exact ids the decoder receives for
generate, chat turn 1 and turn 2, the defaults and the stop tokens. The tiny checkpoints carry
stand-in remote-code files that hold only the definitions telling the revisions apart."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xcomposer import InternLM, XComposer
from xcomposer.llm.chat import INTERNLM_META_INSTRUCTION, chat_template_of
from xcomposer.models.xcomposer import XCOMPOSER_META_INSTRUCTION, variant_of
from xcomposer.tiny import write_remote_code, write_tiny_internlm, write_tiny_xcomposer

GREEDY = dict(do_sample=False, max_new_tokens=6)


class DecoderInputs:
    """Records what each call of a decoder's forward receives (input ids or input embeddings)."""

    def __init__(self, decoder: torch.nn.Module):
        self.calls: list[dict] = []
        self._handle = decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        self.calls.append({"ids": None if ids is None else ids.detach().clone(),
                           "embeds": None if embeds is None else embeds.detach().clone()})

    def prompt_ids(self) -> list[int]:
        first = self.calls[0]["ids"]
        assert first.shape[0] == 1
        return first[0].tolist()

    def close(self):
        self._handle.remove()


@pytest.fixture
def record():
    hooks = []

    def start(decoder):
        h = DecoderInputs(decoder)
        hooks.append(h)
        return h

    yield start
    for h in hooks:
        h.close()


# -- internlm-chat-7b: July 2023 and December 2023 ------------------------------------------------

@pytest.fixture(scope="module")
def chat_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("revisions")
    return {rev: write_tiny_internlm(root / str(rev), revision=rev) for rev in ("2023-07", "2023-12", None)}


@pytest.fixture(scope="module")
def july(chat_ckpts):
    return InternLM.from_pretrained(chat_ckpts["2023-07"])


@pytest.fixture(scope="module")
def december(chat_ckpts):
    return InternLM.from_pretrained(chat_ckpts["2023-12"])


def test_the_revision_is_read_from_the_remote_code(chat_ckpts, july, december, capsys):
    assert july.chat_template == "2023-07" and december.chat_template == "2023-12"
    assert "defines meta_instruction" in december.load_notes[0]
    assert "has no meta_instruction" in july.load_notes[0]
    plain = InternLM.from_pretrained(chat_ckpts[None])
    assert plain.chat_template == "2023-12" and "template='2023-07'" in plain.load_notes[0]
    assert "chat template 2023-12" in capsys.readouterr().err  # the load message says what decided it
    forced = InternLM.from_pretrained(chat_ckpts["2023-12"], template="2023-07")
    assert forced.chat_template == "2023-07" and forced.load_notes == ["chat template 2023-07 (template= given)"]
    with pytest.raises(ValueError, match="unknown chat template '2024'"):
        InternLM.from_pretrained(chat_ckpts[None], template="2024")


def test_the_remote_code_is_read_not_run(tmp_path):
    # a file that would fail (or do harm) if executed; only its text decides
    code = tmp_path / "modeling_internlm.py"
    code.write_text("raise SystemExit('executed!')\n# meta_instruction in a comment does not count\n"
                    "x = 'meta_instruction in a string does not count'\n")
    assert chat_template_of(tmp_path)[0] == "2023-07"
    code.write_text("raise SystemExit('executed!')\ndef chat(self, meta_instruction=''):\n    return 1\n")
    assert chat_template_of(tmp_path)[0] == "2023-12"


def test_july_2023_turns(july, record):
    tok = july.tokenizer
    rec = record(july)
    r1, h1 = july.chat(tok, "hello", history=[], **GREEDY)
    assert rec.prompt_ids() == [tok.bos_token_id] + tok.encode("<|User|>:hello<eoh>\n<|Bot|>:", add_bos=False)
    rec.calls.clear()
    july.chat(tok, "more", history=h1, **GREEDY)
    expected = tok.encode(f"<|User|>:hello<eoh>\n<|Bot|>:{r1}<eoa>\n<|User|>:more<eoh>\n<|Bot|>:")
    assert rec.prompt_ids() == expected
    assert expected.count(tok.bos_token_id) == 1 and expected.count(tok.eoh_token_id) == 2  # one <s>: our fix
    with pytest.raises(ValueError, match="no system turn"):
        july.chat(tok, "hi", meta_instruction="Be brief.")


def test_december_2023_turns(december, record):
    tok = december.tokenizer
    rec = record(december)
    r1, h1 = december.chat(tok, "hello", history=[], **GREEDY)
    system = "<|System|>:" + INTERNLM_META_INSTRUCTION + "\n"
    ids = rec.prompt_ids()
    assert ids == tok.encode(system + "<|User|>:hello\n<|Bot|>:")
    assert tok.eoh_token_id not in ids and ids.count(tok.bos_token_id) == 1
    rec.calls.clear()
    december.chat(tok, "more", history=h1, **GREEDY)
    assert rec.prompt_ids() == tok.encode(system + f"<|User|>:hello\n<|Bot|>:{r1}<eoa>\n<|User|>:more\n<|Bot|>:")
    rec.calls.clear()  # an explicit meta instruction replaces the default; "" leaves the system turn out
    december.chat(tok, "hello", meta_instruction="Answer in French.", **GREEDY)
    assert rec.prompt_ids() == tok.encode("<|System|>:Answer in French.\n<|User|>:hello\n<|Bot|>:")
    rec.calls.clear()
    list(december.stream_chat(tok, "hello", meta_instruction="", **GREEDY))
    assert rec.prompt_ids() == tok.encode("<|User|>:hello\n<|Bot|>:")


def test_internlm_chat_defaults_and_stops(july, december):
    for m in (july, december):
        cfg = m.chat_format.generation_config({})
        assert (cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p) == (1024, True, 0.8, 0.8)
        assert cfg.stop_ids == [m.tokenizer.eos_token_id, m.tokenizer.eoa_token_id]


# -- internlm-xcomposer-7b and -vl-7b ------------------------------------------------------------

@pytest.fixture(scope="module")
def xc_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {v: write_tiny_xcomposer(root / f"x-{v}", variant=v) for v in ("7b", "vl-7b", None)}


@pytest.fixture(scope="module")
def xc7b(xc_ckpts):
    return XComposer.from_pretrained(xc_ckpts["7b"])


@pytest.fixture(scope="module")
def xcvl(xc_ckpts):
    return XComposer.from_pretrained(xc_ckpts["vl-7b"])


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_the_variant_is_read_from_the_remote_code(xc_ckpts, xc7b, xcvl, tmp_path):
    assert (xc7b.variant, xcvl.variant) == ("7b", "vl-7b")
    assert "defines meta_instruction" in xc7b.load_notes[0] and "has no meta_instruction" in xcvl.load_notes[0]
    plain = XComposer.from_pretrained(xc_ckpts[None])
    assert plain.variant == "vl-7b" and "variant='7b'" in plain.load_notes[0]
    assert XComposer.from_pretrained(xc_ckpts[None], variant="7b").variant == "7b"
    with pytest.raises(ValueError, match="unknown XComposer variant 'vl'"):
        XComposer.from_pretrained(xc_ckpts[None], variant="vl")
    # without remote code, the hub id (or folder name) is the hint
    assert variant_of(tmp_path, "internlm/internlm-xcomposer-7b")[0] == "7b"
    assert variant_of(tmp_path, "internlm/internlm-xcomposer-vl-7b")[0] == "vl-7b"
    write_remote_code(tmp_path, "modeling_InternLM_XComposer.py", "7b")  # the file outranks the name
    assert variant_of(tmp_path, "internlm/internlm-xcomposer-vl-7b")[0] == "7b"


def _embeds_of(model, segments) -> torch.Tensor:
    """The decoder input that upstream's wrap_prompt builds from these pieces (ids or image embeds)."""
    emb = model.llm.model.embed_tokens
    return torch.cat([s if isinstance(s, torch.Tensor) else emb(torch.tensor(s)) for s in segments])


@pytest.mark.parametrize("variant", ["7b", "vl-7b"])
def test_xcomposer_turns(variant, xc7b, xcvl, photo, record):
    model = xc7b if variant == "7b" else xcvl
    tok = model.tokenizer
    meta = XCOMPOSER_META_INSTRUCTION if variant == "7b" else ""
    image = model._image_embeds([str(photo)], {})[0]
    rec = record(model.llm)
    with torch.inference_mode():
        model.generate("Describe it", image=str(photo), num_beams=1, max_new_tokens=4)
        first = [tok.encode(meta + " <|User|>:", add_bos=True), image, tok.encode("Describe it", add_bos=False),
                 tok.encode("\n<TOKENS_UNUSED_0> <|Bot|>:", add_bos=False)]
        got = rec.calls[0]["embeds"][0]
        assert torch.equal(got, _embeds_of(model, first))
        assert tok.encode(meta + " <|User|>:", add_bos=True)[0] == tok.bos_token_id
        # chat turn 2 = turn 1's prompt, the reply, <eoa>, the new turn; the meta instruction stays once, in front
        reply, history = model.chat("Describe it", image=str(photo), num_beams=1, max_new_tokens=4)
        rec.calls.clear()
        model.chat("And then?", history=history, num_beams=1, max_new_tokens=4)
        second = first + [tok.encode(reply, add_bos=False) + [tok.eoa_token_id],
                          tok.encode(" <|User|>:", add_bos=False), tok.encode("And then?", add_bos=False),
                          tok.encode("\n<TOKENS_UNUSED_0> <|Bot|>:", add_bos=False)]
        assert torch.equal(rec.calls[0]["embeds"][0], _embeds_of(model, second))


def test_xcomposer_defaults_and_stops(xc7b, xcvl):
    tok = xc7b.tokenizer
    c7, cvl = xc7b._gen_config({}), xcvl._gen_config({})
    for c in (c7, cvl):
        assert (c.num_beams, c.do_sample, c.repetition_penalty, c.length_penalty, c.min_new_tokens) == \
            (5, False, 1.5, 1.0, 1)
    assert (c7.max_new_tokens, cvl.max_new_tokens) == (500, 200)
    assert c7.stop_ids == [tok.eos_token_id, tok.eoa_token_id, tok.eoh_token_id]
    assert cvl.stop_ids == [tok.eos_token_id, tok.eoa_token_id]
    assert xc7b._gen_config({"max_new_tokens": 9}).max_new_tokens == 9
