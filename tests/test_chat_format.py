"""The chat format each model family owns (llm/chat_format.py; XComposer's next to their models): the
one place prompts, defaults, stop tokens, history rules and the token budget come from.

For every family, on tiny upstream-layout checkpoints: a conversation fitted to a budget leaves out
its oldest exchanges and says how many, and what it keeps is exactly the prompt of the shorter
conversation; the last exchange that would not fit is the one left out; `turn` returns the whole
history `chat()` returns; `keep_first` keeps the first exchange; the eager path (`stream_turn`) gives
`chat()`'s greedy reply and history; the bad requests name the field."""
from __future__ import annotations

import pytest
import torch

from vl_util import picture
from xcomposer import InternLM, XComposer
from xcomposer.llm.chat_format import ChatFormatError, Message
from xcomposer.llm.generation import PromptTooLongError
from xcomposer.tiny import (write_tiny_internlm, write_tiny_internlm2, write_tiny_xcomposer, write_tiny_xcomposer2,
                            write_tiny_xcomposer2d5)

FAMILIES = ["internlm", "internlm2", "xcomposer", "xcomposer2", "xcomposer2d5"]
GREEDY = dict(do_sample=False, max_new_tokens=6, num_beams=1, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("chat-format")


@pytest.fixture(scope="module")
def images(root):
    paths = []
    for k in range(4):
        p = root / f"pic{k}.png"
        picture(seed=k, size=(40 + 8 * k, 30)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def models(root):
    return {
        "internlm": InternLM.from_pretrained(write_tiny_internlm(root / "lm", max_position_embeddings=1024)),
        "internlm2": InternLM.from_pretrained(write_tiny_internlm2(root / "lm2", max_position_embeddings=1024)),
        "xcomposer": XComposer.from_pretrained(write_tiny_xcomposer(root / "xc", max_position_embeddings=2048)),
        "xcomposer2": XComposer.from_pretrained(write_tiny_xcomposer2(root / "xc2", max_length=4096)),
        "xcomposer2d5": XComposer.from_pretrained(write_tiny_xcomposer2d5(root / "xc25", max_length=8192)),
    }


def conversation(family: str, images: list[str], exchanges: int = 4, system: bool = True) -> list[Message]:
    """A system message (where it matters), `exchanges` question/answer pairs, a last question; on
    vision models the first, third and last questions carry an image."""
    vision = family.startswith("xcomposer")
    msgs = [Message("system", "Answer briefly.")] if system else []
    for k in range(exchanges):
        q = f"question {k} about the river and the trees " * 3
        imgs = [images[k % len(images)]] if vision and k % 2 == 0 else []
        msgs += [Message("user", q, imgs, ("<ImageHere>" + q) if imgs else None),
                 Message("assistant", f"answer {k} about the water " * 3)]
    imgs = [images[-1]] if vision else []
    msgs.append(Message("user", "and now?", imgs, "<ImageHere>and now?" if imgs else None))
    return msgs


def without_oldest(msgs: list[Message], d: int) -> list[Message]:
    head = [m for m in msgs[:1] if m.role == "system"]
    rest = msgs[len(head):]
    return head + rest[2 * d:]


def built(made):
    """The decoder input a ChatPrompt stands for: ids, or the embeddings (and image mask) it builds."""
    if made.ids is not None:
        return made.ids
    with torch.inference_mode():
        out = made.build()
    return out if isinstance(out, tuple) else (out,)


def same(a, b) -> bool:
    if isinstance(a, list):
        return a == b
    return len(a) == len(b) and all(
        x == y if isinstance(x, list) else (x.shape == y.shape and torch.equal(x, y)) for x, y in zip(a, b))


def length_of(b) -> int:
    return len(b) if isinstance(b, list) else b[0].shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_long_conversation_is_fitted_to_the_budget_and_says_what_it_left_out(models, images, family):
    model = models[family]
    fmt = model.chat_format
    cfg = fmt.generation_config({"max_new_tokens": 8})
    msgs = conversation(family, images)
    full = fmt.prompt(msgs, cfg)
    n_full = length_of(built(full))
    assert full.dropped == 0 and full.length in (0, n_full)
    # a budget that the whole conversation does not fit but the last two exchanges do
    shorter = fmt.prompt(without_oldest(msgs, 2), cfg)
    n_short = length_of(built(shorter))
    budget = n_short + 8
    assert n_full + 8 > budget
    made = fmt.prompt(msgs, cfg, budget=budget)
    assert made.dropped in (1, 2)
    kept = built(made)
    # exactly the prompt of the conversation without its `dropped` oldest exchanges ...
    assert same(kept, built(fmt.prompt(without_oldest(msgs, made.dropped), cfg)))
    assert length_of(kept) + 8 <= budget and made.length in (0, length_of(kept))
    # ... and the one before it does not fit: no more was left out than needed
    assert length_of(built(fmt.prompt(without_oldest(msgs, made.dropped - 1), cfg))) + 8 > budget
    if family == "internlm2":  # the system turn stays
        assert fmt.tokenizer.decode(kept[:12], skip_special_tokens=False).startswith("<s><|im_start|>system\nAnswer")
    # the last question alone does not fit: an error, the question is never cut
    with pytest.raises(ChatFormatError, match="10") as e:
        fmt.prompt(msgs, cfg, budget=10)
    assert e.value.param == "messages"


@pytest.mark.parametrize("family", FAMILIES)
def test_turn_fits_the_model_history_and_returns_all_of_it(models, images, family):
    """`turn` reads the history `chat()` returns, fits it to the budget and gives back the whole of
    it with the new turn, as `chat()` would (the left-out exchanges are still in it)."""
    model = models[family]
    fmt = model.chat_format
    cfg = fmt.generation_config({"max_new_tokens": 8})
    vision = family.startswith("xcomposer")
    history = []
    for k in range(3):
        imgs = [images[k]] if vision and k != 1 else []
        _, history = model_chat(model, family, f"question {k} about the trees " * 3, imgs, history)
    query, imgs = "and then?", ([images[3]] if vision else [])
    whole = fmt.turn(query, imgs, history, cfg)
    expect = whole.history("REPLY")
    assert whole.dropped == 0 and len(expect) == len(history) + fmt.history_entries_per_turn
    if family in ("xcomposer2", "xcomposer2d5"):  # what the model's own prepare_chat returns
        assert expect == [list(t) for t in model.prepare_chat(query, imgs or None, history)[1]("REPLY")]
    budget = length_of(built(whole)) + 8 - 1
    cut = fmt.turn(query, imgs, history, cfg, budget=budget)
    built(cut)
    assert cut.dropped >= 1 and cut.history("REPLY") == expect
    first = fmt.turn(query, imgs, history, cfg, budget=budget, keep_first=True)
    assert first.dropped >= 1
    kept = built(first)
    # keep_first: what the model reads starts with the first exchange
    kept_history = history[:fmt.history_entries_per_turn] + history[fmt.history_entries_per_turn * (1 + first.dropped):]
    assert same(kept, built(fmt.turn(query, imgs, kept_history, cfg)))
    assert first.history("REPLY") == expect


def model_chat(model, family, query, imgs, history, **options):
    opts = {**GREEDY, **options}
    if family.startswith("internlm"):
        return model.chat(model.tokenizer, query, history=history, **opts)
    if family == "xcomposer":
        return model.chat(query, image=imgs or None, history=history, **opts)
    return model.chat(query, image=imgs or None, history=history, **opts)


@pytest.mark.parametrize("family,beams", [(f, 1) for f in FAMILIES] + [("internlm2", 3), ("xcomposer", 3)])
def test_the_eager_turn_is_chats_reply_and_history(models, images, family, beams):
    """The web demo's beam-search / no-engine path generates from the chat format's prompt: the
    reply and history equal the model's own chat(), greedy or with beams."""
    model = models[family]
    fmt = model.chat_format
    vision = family.startswith("xcomposer")
    _, history = model_chat(model, family, "what is here?", [images[0]] if vision else [], [])
    query, imgs = "and the colour?", ([images[1]] if vision else [])
    options = {**GREEDY, "num_beams": beams, "max_new_tokens": 12}
    reply, want = model_chat(model, family, query, imgs, history, **options)
    events = list(fmt.stream_turn(query, imgs, history, options))
    assert events[0] == ("dropped", 0) and events[-1][0] == "history"
    assert "".join(v for k, v in events if k == "piece") == reply
    got = events[-1][1]
    assert [list(t) if isinstance(t, tuple) else t for t in got] == [list(t) if isinstance(t, tuple) else t
                                                                     for t in want]


def test_defaults_stops_and_history_codec_are_the_familys(models):
    lm2, xc, xc2 = models["internlm2"], models["xcomposer"], models["xcomposer2"]
    cfg = lm2.chat_format.generation_config({})
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p) == (1024, True, 0.8, 0.8)
    assert lm2.chat_format.stop_ids == [lm2.tokenizer.eos_token_id, lm2.tokenizer.chat_token_id("<|im_end|>")]
    tok = xc.tokenizer
    assert set(xc.chat_format.generation_config({"num_beams": 1}).stop_ids) == {
        tok.eos_token_id, tok.eoa_token_id, tok.eoh_token_id}
    assert set(xc.chat_format.stop_ids) == set(xc._gen_config({}).stop_ids)  # 5 beams: upstream's stops
    assert xc.chat_format.generation_config({}).num_beams == 5  # upstream's default; the server asks for 1
    assert xc2.chat_format.generation_config({}).repetition_penalty == 1.005
    assert [f.history_entries_per_turn for f in (lm2.chat_format, xc.chat_format, xc2.chat_format)] == [1, 2, 1]
    assert lm2.chat_format.tool_calls and not models["internlm"].chat_format.tool_calls
    assert models["xcomposer2d5"].chat_format.takes_video and not xc2.chat_format.takes_video
    with pytest.raises(ValueError, match=r"history\[0\]"):
        lm2.chat_format.check_history([("only one",)])
    with pytest.raises(ValueError, match=r"history has 1 entries"):
        xc.chat_format.check_history([{"role": "user", "text": "q"}])


def test_bad_requests_name_the_field(models, images):
    lm2, xc2 = models["internlm2"].chat_format.named("tiny-lm2"), models["xcomposer2"].chat_format
    cfg = lm2.generation_config({})
    with pytest.raises(ChatFormatError, match="'tiny-lm2' is a text model") as e:
        lm2.prompt([Message("user", "hi", [images[0]], "<ImageHere>hi")], cfg)
    assert e.value.param == "messages[0].content"
    with pytest.raises(ChatFormatError) as e:
        xc2.prompt([Message("user", "hi")], cfg, hd_num=4)
    assert e.value.param == "hd_num"
    with pytest.raises(ChatFormatError, match="takes no video"):
        xc2.prompt([Message("user", "hi", ["/tmp/clip.mp4"], "<ImageHere>hi")], cfg)
    with pytest.raises(ChatFormatError) as e:
        models["xcomposer2d5"].chat_format.prompt([Message("user", "hi")], cfg, infer_mode="poem")
    assert e.value.param == "infer_mode"
    with pytest.raises(ChatFormatError) as e:
        lm2.prompt([Message("user", "a"), Message("system", "late"), Message("user", "b")], cfg)
    assert e.value.param == "messages[1].role"
    with pytest.raises(ChatFormatError) as e:
        lm2.prompt([Message("user", "  ")], cfg)
    assert e.value.param == "messages[0].content"
    with pytest.raises(ChatFormatError, match="no tool-call format"):
        models["internlm"].chat_format.tool_prompt([Message("user", "hi")], [])
