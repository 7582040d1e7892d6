"""The text-only page's parts without a browser: reading documents, token counts against the
context window, the documents-then-question prompt of InternLM's file chat, and refusals."""
from __future__ import annotations

import pytest

from xcomposer import InternLM
from xcomposer.serve.webui import UserError, build_app
from xcomposer.serve.webui.text_app import DOC_DEFAULTS, DocSession, TextChatSession, TextDemoApp, read_document
from xcomposer.tiny import write_tiny_internlm2

from pdf_util import make_pdf


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    model = InternLM.from_pretrained(write_tiny_internlm2(tmp_path_factory.mktemp("text-model")))
    return TextDemoApp(model, tmp_path_factory.mktemp("out"), chat_defaults=dict(max_new_tokens=12),
                       doc_defaults=dict(max_new_tokens=12))


def test_read_document_kinds_and_refusals(tmp_path):
    (tmp_path / "a.txt").write_text("plain text\r\nsecond line", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Title\n\n- item", encoding="utf-8")
    (tmp_path / "c.pdf").write_bytes(make_pdf(["The cat sat on the mat.", "Second line here."]))
    assert read_document(tmp_path / "a.txt") == ("text", "plain text\nsecond line")
    assert read_document(tmp_path / "b.md") == ("Markdown", "# Title\n\n- item")
    kind, text = read_document(tmp_path / "c.pdf")
    assert kind == "PDF" and "The cat sat on the mat." in text and "Second line here." in text
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4\n not really a pdf")
    with pytest.raises(UserError, match="bad.pdf cannot be read as a PDF"):
        read_document(tmp_path / "bad.pdf")
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="latin.txt is not UTF-8 text"):
        read_document(tmp_path / "latin.txt")
    (tmp_path / "empty.md").write_text("  \n", encoding="utf-8")
    with pytest.raises(UserError, match="empty.md holds no text"):
        read_document(tmp_path / "empty.md")
    (tmp_path / "x.docx").write_bytes(b"PK")
    with pytest.raises(UserError, match="only PDF, TXT and Markdown"):
        read_document(tmp_path / "x.docx")


def test_documents_go_before_the_first_question(app, tmp_path):
    (tmp_path / "notes.txt").write_text("The meeting is on Tuesday.", encoding="utf-8")
    (tmp_path / "plan.pdf").write_bytes(make_pdf(["Budget: 300 units."]))
    st = app.add_documents([str(tmp_path / "notes.txt"), str(tmp_path / "plan.pdf")], DocSession())
    assert [d.name for d in st.documents] == ["notes.txt", "plan.pdf"]
    assert st.documents[0].tokens == len(app.model.tokenizer.encode("The meeting is on Tuesday.", add_bos=False))
    table = app.documents_table(st)
    assert "notes.txt" in table and f"of {app.window}" in table and str(st.documents[0].tokens) in table
    options = app.chat_options(**{k: DOC_DEFAULTS[k] for k in ("num_beams", "repetition_penalty", "do_sample",
                                                               "temperature", "top_p")}, max_new_tokens=12)
    assert options["temperature"] == 0.05 and options["repetition_penalty"] == 1.02
    *_, (messages, done) = list(app.doc_turn("When is the meeting?", st, options))
    q, r = done.history[0]
    assert q == "The meeting is on Tuesday.\n\nBudget: 300 units.\n\nWhen is the meeting?"
    assert messages[0] == {"role": "user", "content": "When is the meeting?"}  # the page shows the question
    *_, (messages, again) = list(app.doc_turn("And the budget?", done, options))
    assert again.history[1][0] == "And the budget?" and len(messages) == 4
    with pytest.raises(UserError, match="already part of this conversation"):
        app.add_documents([str(tmp_path / "notes.txt")], again)


def test_a_document_that_does_not_fit_is_refused_with_both_numbers(app, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("word " * 3000, encoding="utf-8")
    st = app.add_documents([str(big)], DocSession())
    tokens = st.documents[0].tokens
    assert tokens > app.window and f"do not fit**: {tokens} tokens, the context window is {app.window}" in \
        app.documents_table(st)
    with pytest.raises(UserError, match=rf"take \d+ tokens but the context window is {app.window}"):
        next(app.doc_turn("Summarise", st, app.chat_options(12, 1, 1.02, False, 0.05, 1.0)))
    with pytest.raises(UserError, match="upload a document first"):
        next(app.doc_turn("Summarise", DocSession(), app.chat_options(12, 1, 1.02, False, 0.05, 1.0)))


def test_text_chat_turn_keeps_query_response_pairs(app):
    *_, (messages, st) = list(app.text_chat_turn("hello", TextChatSession(), app.chat_options(8, 1, 1.0, False, 1.0, 1.0)))
    assert st.history[0][0] == "hello" and messages[-1]["role"] == "assistant"
    greedy = app.model.chat(app.model.tokenizer, "hello", do_sample=False, max_new_tokens=8, num_beams=1,
                            repetition_penalty=1.0)[0]
    assert st.history[0][1] == greedy


def test_text_only_page_has_chat_and_documents_and_no_composition(app):
    demo = build_app(app)
    config = demo.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"chat-tab", "documents-tab", "doc-files", "doc-table", "doc-chatbot", "text-only-note"} <= ids
    assert "compose-btn" not in ids and "title" not in ids
