"""The web demo's chat tab on XComposer2 (DemoApp handlers, eager and through the batching engine):
two turns about an uploaded image answer exactly what XComposer2.chat answers."""
import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from xcomposer.models.xcomposer2 import XComposer2  # noqa: E402
from xcomposer.serve.webui import DemoApp  # noqa: E402
from xcomposer.serve.webui.app import ChatSession  # noqa: E402
from xcomposer.tiny import write_tiny_xcomposer2  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return XComposer2.from_pretrained(write_tiny_xcomposer2(tmp_path_factory.mktemp("xc2") / "c"))


def _png(path):
    g = torch.Generator().manual_seed(3)
    Image.fromarray((torch.rand(30, 40, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
    return path


@pytest.mark.parametrize("batch", [1, 2])
def test_two_turns_equal_model_chat(model, tmp_path, batch):
    app = DemoApp(model, None, tmp_path / "out", max_batch_size=batch)
    try:
        assert app.xcomposer2 and app.chat_defaults["repetition_penalty"] == 1.005
        refs, shown = app.store_uploads([str(_png(tmp_path / "a.png"))], "s")
        opts = app.chat_options(12, 1, 1.005, False, 1.0, 0.8)
        msgs, s1 = list(app.chat_turn("What is it?", refs, shown, ChatSession(), opts))[-1]
        want1, hist = model.chat("<ImageHere>What is it?", image=refs, max_new_tokens=12, do_sample=False)
        assert msgs[-1]["content"] == want1 or (not want1.strip() and "empty" in msgs[-1]["content"])
        assert s1.history == [["<ImageHere>What is it?", want1, refs]] and s1.images == refs
        msgs2, s2 = list(app.chat_turn("And more?", [], [], s1, opts))[-1]
        want2, _ = model.chat("And more?", history=hist, max_new_tokens=12, do_sample=False)  # hist keeps refs
        assert s2.history[-1] == ["And more?", want2] and len(s2.messages) == 4
    finally:
        app.close()


def test_page_has_chat_and_its_own_composition(model, tmp_path):
    from xcomposer.serve.webui import build_app
    app = DemoApp(model, None, tmp_path / "out")
    demo = build_app(app)
    blocks = list(demo.blocks.values())
    labels = [getattr(b, "label", None) or "" for b in blocks]
    assert any("Instruction" in lab for lab in labels) and any("Chat" == lab for lab in labels)
    refs = next(b for b in blocks if getattr(b, "elem_id", None) == "references")
    assert refs.visible and refs.file_count == "multiple"
    lang = next(b for b in blocks if getattr(b, "elem_id", None) == "lang")
    assert not lang.visible  # upstream's Chinese prompts only
    # upstream gradio_demo_composition.py's defaults
    assert app.compose_defaults == dict(max_new_tokens=4096, num_beams=1, repetition_penalty=1.005, do_sample=True,
                                        num_images=6, seed=8909, with_meta=False)


def test_regenerate_asks_the_last_question_again_for_every_model_kind(model, tmp_path):
    """Regenerate (the chat tab's button) for XComposer2, text InternLM2 and XComposer 1.0: after
    two turns it asks the second question again on the first turn's state (one history entry per
    turn for (query, response) histories, two for XComposer 1.0's), and greedy gives the same reply."""
    from xcomposer import InternLM, XComposer
    from xcomposer.tiny import write_tiny_internlm2, write_tiny_xcomposer

    apps = [DemoApp(model, None, tmp_path / "xc2"),
            DemoApp(InternLM.from_pretrained(write_tiny_internlm2(tmp_path / "lm2")), None, tmp_path / "lm2o"),
            DemoApp(XComposer.from_pretrained(write_tiny_xcomposer(tmp_path / "xc1")), None, tmp_path / "xc1o")]
    for app in apps:
        refs, shown = app.store_uploads([str(_png(tmp_path / "a.png"))], "s") if app.vision else ([], [])
        refs2, shown2 = app.store_uploads([str(_png(tmp_path / "b.png"))], "s") if app.vision else ([], [])
        opts = app.chat_options(8, 1, 1.0, False, 1.0, 0.8)
        with pytest.raises(ValueError, match="nothing to regenerate"):
            app.regenerate_turn(ChatSession())
        _, s1 = list(app.chat_turn("What is it?", refs, shown, ChatSession(), opts))[-1]
        msgs2, s2 = list(app.chat_turn("And this one?", refs2, shown2, s1, opts))[-1]
        assert len(s2.history) == 2 * app.history_entries_per_turn
        text, r, sh, previous = app.regenerate_turn(s2)
        assert (text, r, sh) == ("And this one?", refs2, shown2)
        assert previous.history == s1.history and previous.messages == s1.messages and previous.images == s1.images
        again_msgs, again = list(app.chat_turn(text, r, sh, previous, opts))[-1]
        assert again.history == s2.history and again_msgs == msgs2
        _, p1 = app.regenerate_turn(s1)[2:]  # after one turn: back to the empty session
        assert p1.history == [] and p1.messages == []
