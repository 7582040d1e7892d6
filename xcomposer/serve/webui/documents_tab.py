"""The documents tab (text-only models): upload PDF, TXT or Markdown files, see each one's length in
tokens against the context window, and ask about them. The documents go in front of the first
question, as InternLM's long-context file chat does (`serve/documents.py`); later questions continue
the conversation. Options default to InternLM's settings for long inputs."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from ...llm.tokenizer import check_text
from ..documents import LONG_INPUT_DEFAULTS, Document, DocumentError, read_document, with_documents
from .app import MAX_QUESTION_CHARS, ChatSession, DemoApp, UserError, _error_md, describe_error, without_surrogates

MAX_DOCUMENTS = 8


@dataclass
class DocSession:
    documents: tuple[Document, ...] = ()
    tokens: tuple[int, ...] = ()
    used: bool = False  # the documents went into the conversation with the first question
    chat: ChatSession = field(default_factory=ChatSession)


def document_list(app: DemoApp, session: DocSession) -> str:
    window = app.model.context_window
    if not session.documents:
        return f"No documents yet. The model's context window is {window:,} tokens."
    rows = [f"- **{html.escape(d.name)}** ({d.kind}{f', {d.pages} pages' if d.pages else ''}): "
            f"{n:,} tokens" for d, n in zip(session.documents, session.tokens)]
    total = sum(session.tokens)
    note = " (in the conversation)" if session.used else ""
    return "\n".join(rows) + f"\n\nTogether {total:,} of the {window:,}-token context window{note}."


def load_documents(app: DemoApp, files: list, reply_room: int) -> DocSession:
    """Read the uploaded files; refuse them all if one is unreadable or they do not fit."""
    files = [f for f in files or [] if f is not None]
    if not files:
        raise UserError("choose a PDF, TXT or Markdown file to upload")
    if len(files) > MAX_DOCUMENTS:
        raise UserError(f"{len(files)} documents at once; upload at most {MAX_DOCUMENTS}")
    docs = []
    for f in files:
        path = f if isinstance(f, str) else getattr(f, "path", None) or getattr(f, "name", None)
        if not isinstance(path, str):
            raise UserError("an upload arrived without a file; upload it again")
        docs.append(read_document(path, Path(getattr(f, "orig_name", None) or path).name))
    tok = app.model.tokenizer
    tokens = tuple(len(tok.encode(d.text, add_bos=False)) for d in docs)
    window, total = app.model.context_window, sum(tokens)
    if total + reply_room > window:
        sizes = ", ".join(f"{d.name} {n:,}" for d, n in zip(docs, tokens))
        raise UserError(f"the documents are {total:,} tokens ({sizes}) and the reply needs room for {reply_room:,} "
                        f"more, but the model's context window is {window:,} tokens: upload less text, lower "
                        f"'Max new tokens', or load a long-context model (e.g. internlm2_5-7b-chat-1m)")
    return DocSession(documents=tuple(docs), tokens=tokens)


def left_out_note(removed: int) -> str:
    """The documents stay; older questions make room, and the page says so."""
    return (f'<span class="xc-note">Kept the documents; left out the {removed} oldest question(s) after them '
            f'to fit the context window.</span>') if removed else ""


def documents_tab(app: DemoApp, model_job: dict) -> None:
    """Lay out the tab inside the open `gr.Blocks` and wire its handlers."""
    d = LONG_INPUT_DEFAULTS
    with gr.Tab("Documents", id="documents-tab", elem_id="documents-tab"):
        doc_state = gr.State(DocSession())
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                upload = gr.File(label="Documents (PDF, TXT, Markdown)", file_count="multiple",
                                 file_types=[".pdf", ".txt", ".md"], elem_id="doc-upload")
                doc_list = gr.Markdown(document_list(app, DocSession()), elem_id="doc-list")
                with gr.Accordion("Generation options", open=False):
                    d_max = gr.Slider(16, 4096, value=d["max_new_tokens"], step=16, label="Max new tokens",
                                      elem_id="doc-max-tokens")
                    d_temp = gr.Slider(0.0, 1.0, value=d["temperature"], step=0.01, label="Temperature",
                                       elem_id="doc-temperature")
                    d_top_p = gr.Slider(0.05, 1.0, value=d["top_p"], step=0.05, label="Top-p", elem_id="doc-top-p")
                    d_pen = gr.Slider(0.8, 1.2, value=d["repetition_penalty"], step=0.001,
                                      label="Repetition penalty", elem_id="doc-penalty")
            with gr.Column(scale=2, min_width=360):
                doc_chat = gr.Chatbot(label="Questions about the documents", height=420, elem_id="doc-chatbot")
                doc_error = gr.Markdown("", elem_id="doc-error")
                question = gr.Textbox(placeholder="Ask about the documents", show_label=False, elem_id="doc-question",
                                      max_lines=4)
                with gr.Row():
                    ask_btn = gr.Button("Ask", variant="primary", elem_id="doc-ask")
                    clear = gr.Button("Clear conversation", elem_id="doc-clear")
    opts = [d_max, d_temp, d_top_p, d_pen]

    def on_upload(files, state: DocSession, max_new):
        try:
            new = load_documents(app, files, int(max_new))
        except (UserError, DocumentError) as e:
            return state, document_list(app, state), _error_md(str(e)), state.chat.messages
        except Exception as e:  # reported in the page; the app keeps serving
            return state, document_list(app, state), _error_md(describe_error(e)), state.chat.messages
        return new, document_list(app, new), "", []  # new documents start a new conversation

    upload.upload(on_upload, [upload, doc_state, d_max], [doc_state, doc_list, doc_error, doc_chat])

    def ask(text, state: DocSession, max_new, temp, top_p, pen):
        text = (text or "").strip()
        try:
            check_text(text, "the question")
            if not text:
                raise UserError("type a question about the documents")
            if len(text) > MAX_QUESTION_CHARS:
                raise UserError(f"the question is {len(text)} characters; keep it under {MAX_QUESTION_CHARS}")
            if not state.documents:
                raise UserError("upload a document first (PDF, TXT or Markdown)")
            options = dict(max_new_tokens=int(max_new), repetition_penalty=float(pen), do_sample=float(temp) > 0,
                           num_beams=1)
            if options["do_sample"]:
                options.update(temperature=float(temp), top_p=float(top_p))
            model_text = None if state.used else with_documents(text, list(state.documents))
            chat, removed = (app.fit_document_chat(state.chat, text, options["max_new_tokens"]) if state.used
                             else (state.chat, 0))
        except Exception as e:
            yield state.chat.messages, state, gr.update(), _error_md(describe_error(e)), document_list(app, state)
            return
        try:
            for messages, new_chat in app.chat_turn(text, [], [], chat, options, model_text=model_text,
                                                    keep_first=True):
                done = new_chat is not chat
                new = DocSession(state.documents, state.tokens, used=True, chat=new_chat) if done else state
                yield messages, new, "", left_out_note(removed + (new_chat.dropped if done else 0)), \
                    document_list(app, new)
        except Exception as e:
            yield (state.chat.messages, state, gr.update(value=without_surrogates(text)), _error_md(describe_error(e)),
                   document_list(app, state))

    outputs = [doc_chat, doc_state, question, doc_error, doc_list]
    ask_btn.click(ask, [question, doc_state, *opts], outputs, **model_job)
    question.submit(ask, [question, doc_state, *opts], outputs, **model_job)

    def restart(state: DocSession):
        new = DocSession(state.documents, state.tokens)
        return [], new, "", document_list(app, new)

    clear.click(restart, [doc_state], [doc_chat, doc_state, doc_error, doc_list])
