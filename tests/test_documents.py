"""Documents for the chat-over-documents tab: PDF text layers through pypdf, TXT and Markdown, each
bad file refused with a message naming it, and InternLM's file-chat layout."""
from __future__ import annotations

import pytest
from PIL import Image

from xcomposer import InternLM
from xcomposer.serve.documents import LONG_INPUT_DEFAULTS, DocumentError, read_document, with_documents
from xcomposer.serve.webui import DemoApp, UserError
from xcomposer.serve.webui.documents_tab import DocSession, document_list, load_documents
from xcomposer.tiny import write_tiny_internlm

from conftest import make_text_pdf


def test_pdf_text_layer_pages_and_kind(tmp_path):
    pdf = tmp_path / "report.pdf"
    make_text_pdf(pdf, ["Quarterly report", "Revenue grew (a lot)"])
    doc = read_document(pdf)
    assert (doc.name, doc.kind, doc.pages) == ("report.pdf", "pdf", 2)
    assert doc.text == "Quarterly report\n\nRevenue grew (a lot)"


@pytest.mark.parametrize("name,data,text", [
    ("notes.txt", "第一行\r\nsecond line\r\n".encode("utf-8"), "第一行\nsecond line"),
    ("notes.md", b"\xef\xbb\xbf# Title\n\n- item\n", "# Title\n\n- item"),
    ("wide.txt", "UTF-16 text ✓".encode("utf-16"), "UTF-16 text ✓"),
])
def test_text_and_markdown(tmp_path, name, data, text):
    path = tmp_path / name
    path.write_bytes(data)
    assert read_document(path).text == text


def test_the_upload_name_decides_the_kind(tmp_path):
    tmp = tmp_path / "upload-1234"  # gradio's temporary file may lose the suffix
    tmp.write_text("plain text", encoding="utf-8")
    doc = read_document(tmp, name="/some/dir/mine.txt")
    assert doc.name == "mine.txt" and doc.kind == "text"


def _image_pdf(path):
    Image.new("RGB", (60, 40), (10, 200, 30)).save(path, format="PDF")


@pytest.mark.parametrize("name,make,why", [
    ("broken.pdf", lambda p: p.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 8), "damaged"),
    ("cut.pdf", lambda p: (make_text_pdf(p, ["hello"]), p.write_bytes(p.read_bytes()[:60])), "damaged|no text layer"),
    ("fake.pdf", lambda p: p.write_bytes(b"<html>not a pdf</html>"), "no %PDF header"),
    ("scan.pdf", _image_pdf, "no text layer"),
    ("latin1.txt", lambda p: p.write_bytes("café".encode("latin-1")), "not valid UTF-8"),
    ("program.txt", lambda p: p.write_bytes(b"\x7fELF\x00\x00\x01\x02"), "binary file"),
    ("slides.pptx", lambda p: p.write_bytes(b"PK\x03\x04"), "not a PDF, TXT or Markdown"),
    ("empty.md", lambda p: p.write_bytes(b""), "empty"),
    ("blank.txt", lambda p: p.write_bytes(b"  \n\n \t"), "blank"),
])
def test_bad_documents_are_named_with_the_fix(tmp_path, name, make, why):
    path = tmp_path / name
    make(path)
    with pytest.raises(DocumentError, match=why) as e:
        read_document(path)
    assert str(e.value).startswith(name)


def test_an_encrypted_pdf_is_named(tmp_path):
    from pypdf import PdfReader, PdfWriter
    plain = tmp_path / "plain.pdf"
    make_text_pdf(plain, ["secret"])
    writer = PdfWriter()
    writer.append(PdfReader(plain))
    writer.encrypt("pw")
    locked = tmp_path / "locked.pdf"
    with open(locked, "wb") as f:
        writer.write(f)
    with pytest.raises(DocumentError, match="encrypted"):
        read_document(locked)


def test_documents_go_before_the_first_question():
    docs = [read_document_text("a.txt", "Alpha."), read_document_text("b.md", "Beta.")]
    assert with_documents("What is it?", docs) == "Alpha.\n\nBeta.\n\nWhat is it?"
    assert with_documents("Plain?", []) == "Plain?"
    with pytest.raises(ValueError, match="not valid Unicode"):
        with_documents("bad \ud800", docs)
    assert LONG_INPUT_DEFAULTS["temperature"] == 0.05 and LONG_INPUT_DEFAULTS["repetition_penalty"] == 1.02


def read_document_text(name, text):
    from xcomposer.serve.documents import Document
    return Document(name=name, kind="text", text=text)


@pytest.fixture(scope="module")
def text_app(tmp_path_factory):
    model = InternLM.from_pretrained(write_tiny_internlm(tmp_path_factory.mktemp("lm")))
    return DemoApp(model, None, tmp_path_factory.mktemp("out"))


def test_token_counts_against_the_window_and_a_document_that_does_not_fit(text_app, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("a short note about spring", encoding="utf-8")
    session = load_documents(text_app, [str(small)], reply_room=64)
    n = len(text_app.model.tokenizer.encode("a short note about spring", add_bos=False))
    assert session.tokens == (n,)
    listing = document_list(text_app, session)
    assert f"{n:,} tokens" in listing and f"{text_app.model.context_window:,}-token context window" in listing
    big = tmp_path / "big.txt"
    big.write_text("word " * 3000, encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_documents(text_app, [str(small), str(big)], reply_room=64)
    msg = str(e.value)
    assert f"context window is {text_app.model.context_window:,} tokens" in msg and "big.txt" in msg
    assert "long-context model" in msg
    assert document_list(text_app, DocSession()).startswith("No documents yet")


def test_a_text_model_chats_in_pairs_and_refuses_images(text_app, tmp_path):
    from xcomposer.serve.webui import ChatSession
    state = ChatSession()
    *_, (messages, state) = text_app.chat_turn("hello", [], [], state, dict(do_sample=False, max_new_tokens=6))
    assert len(state.history) == 1 and state.history[0][0] == "hello" and messages[-1]["role"] == "assistant"
    *_, (messages2, state2) = text_app.chat_turn("again", [], [], state, dict(do_sample=False, max_new_tokens=6),
                                                  model_text="DOC\n\nagain")
    assert [t[0] for t in state2.history] == ["hello", "DOC\n\nagain"] and messages2[-2]["content"] == ["again"]
    pic = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(pic)
    with pytest.raises(UserError, match="reads text only"):
        text_app.store_uploads([str(pic)], "s1")
    assert text_app.chat_defaults["temperature"] == 0.8 and text_app.chat_defaults["num_beams"] == 1


@pytest.mark.parametrize("family", ["internlm", "internlm2"])
def test_a_growing_document_chat_keeps_the_documents_and_drops_older_questions(tmp_path, family):
    """The model's own chat() drops the oldest turn when a conversation outgrows the window: in a
    document chat that is the turn holding the documents. The web demo keeps it and leaves out the
    oldest question/answer pairs after it, then says so; when even that does not fit, it tells the user."""
    from xcomposer.serve.webui import ChatSession
    from xcomposer.tiny import write_tiny_internlm2
    writer = write_tiny_internlm if family == "internlm" else write_tiny_internlm2
    app = DemoApp(InternLM.from_pretrained(writer(tmp_path / family, max_position_embeddings=1024)), None,
                  tmp_path / "out")
    opts = dict(do_sample=False, max_new_tokens=24)
    doc = "DOCUMENT: " + "the cherry trees bloom in april along the river " * 6
    state = ChatSession()
    *_, (_, state) = app.chat_turn("first?", [], [], state, opts, model_text=doc + "\n\nfirst?")
    removed_total = 0
    for i in range(24):
        q = f"question number {i} about the trees and the river?"
        fitted, removed = app.fit_document_chat(state, q, 24)
        removed_total += removed
        assert fitted.history[0][0].startswith("DOCUMENT:")  # the documents always stay
        *_, (messages, state) = app.chat_turn(q, [], [], fitted, opts)
        assert len(messages) == 2 * (i + 2)  # the page still shows every turn
    assert removed_total > 0  # the conversation did outgrow the window
    # the shortest question that no longer fits beside the documents: the user is told to start over
    for k in range(5, 200, 5):
        try:
            app.fit_document_chat(state, "word " * k, 24)
        except UserError as e:
            assert "press Clear" in str(e)
            break
    else:
        raise AssertionError("no question was too long")


def test_a_chat_past_the_window_says_how_many_exchanges_the_model_left_out(tmp_path):
    """The chat tab's turn, eager (the chat format's stream_turn) or through the engine, fits a long
    conversation the same way: the same exchanges left out, the same greedy reply, every exchange
    kept in the history and on the page, and a note saying how many the model did not read."""
    from xcomposer.serve.webui import ChatSession
    from xcomposer.serve.webui.chat_tab import dropped_note
    from xcomposer.tiny import write_tiny_internlm2
    model = InternLM.from_pretrained(write_tiny_internlm2(tmp_path / "lm2", max_position_embeddings=512))
    history = [[f"question {k} about the cherry trees " * 2, f"answer {k} about april " * 2] for k in range(14)]
    opts = dict(do_sample=False, max_new_tokens=8, num_beams=1, repetition_penalty=1.0)
    results = []
    for batch in (1, 2):  # no engine, then the engine
        app = DemoApp(model, None, tmp_path / f"out{batch}", max_batch_size=batch)
        state = ChatSession(history=[list(t) for t in history])
        try:
            *_, (messages, new) = app.chat_turn("and now?", [], [], state, opts)
        finally:
            app.close()
        results.append((new.dropped, messages[-1]["content"], new.history))
    assert results[0] == results[1]
    dropped, reply, kept_history = results[0]
    assert 0 < dropped < 14 and len(kept_history) == 15 and kept_history[-1] == ["and now?", reply]
    want, _ = model.chat(model.tokenizer, "and now?", history=[tuple(t) for t in history[dropped:]], **opts)
    assert reply == want
    assert f"left out the {dropped} oldest" in dropped_note(new, state) and dropped_note(state, state) == ""
