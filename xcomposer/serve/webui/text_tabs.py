"""The tabs of the text-only page (`text_app.TextDemoApp`): chat, and chat over documents."""
from __future__ import annotations

import gradio as gr

from .app import MAX_QUESTION_CHARS, UserError, _error_md, describe_error
from .text_app import DOC_SUFFIXES, DocSession, TextChatSession, TextDemoApp


def _options(defaults: dict, prefix: str):
    with gr.Accordion("Generation options", open=False):
        return [
            gr.Slider(1, 4096, value=defaults["max_new_tokens"], step=1, label="Max new tokens",
                      elem_id=f"{prefix}-max-tokens"),
            gr.Slider(1, 5, value=defaults["num_beams"], step=1, label="Beams", elem_id=f"{prefix}-beams"),
            gr.Slider(1.0, 2.0, value=defaults["repetition_penalty"], step=0.01, label="Repetition penalty",
                      elem_id=f"{prefix}-penalty"),
            gr.Checkbox(defaults["do_sample"], label="Sampling", elem_id=f"{prefix}-sample"),
            gr.Slider(0.01, 2.0, value=defaults["temperature"], step=0.01, label="Temperature",
                      elem_id=f"{prefix}-temperature"),
            gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="Top-p", elem_id=f"{prefix}-top-p"),
        ]


def _question(text) -> str:
    text = (text or "").strip()
    if not text:
        raise UserError("type a question")
    if len(text) > MAX_QUESTION_CHARS:
        raise UserError(f"the question is {len(text)} characters; keep it under {MAX_QUESTION_CHARS}")
    return text


def text_chat_tab(app: TextDemoApp, model_job: dict) -> None:
    with gr.Tab("Chat", id="chat-tab", elem_id="chat-tab"):
        state = gr.State(TextChatSession())
        chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot")
        error = gr.Markdown("", elem_id="chat-error")
        box = gr.Textbox(placeholder="Ask a question", show_label=False, elem_id="chat-input", lines=1, max_lines=8)
        with gr.Row():
            regen = gr.Button("Regenerate", elem_id="chat-regenerate")
            clear = gr.Button("Clear", elem_id="chat-clear")
        opts = _options(app.chat_defaults, "chat")

    def ask(text, st: TextChatSession, *o):
        try:
            question = _question(text)
            options = app.chat_options(*o)
        except Exception as e:
            yield st.messages, st, gr.update(), _error_md(describe_error(e))
            return
        try:
            for messages, new in app.text_chat_turn(question, st, options):
                yield messages, new, "", ""
        except Exception as e:
            yield st.messages, st, gr.update(value=text), _error_md(describe_error(e))

    box.submit(ask, [box, state, *opts], [chatbot, state, box, error], **model_job)

    def regenerate(st: TextChatSession, *o):
        if st.last is None or not st.history:
            yield st.messages, st, _error_md("nothing to regenerate yet: ask a question first")
            return
        previous = TextChatSession(history=st.history[:-1], messages=st.messages[:-2])
        try:
            for messages, new in app.text_chat_turn(st.last, previous, app.chat_options(*o)):
                yield messages, new, ""
        except Exception as e:
            yield st.messages, st, _error_md(describe_error(e))

    regen.click(regenerate, [state, *opts], [chatbot, state, error], **model_job)
    clear.click(lambda: ([], TextChatSession(), "", ""), None, [chatbot, state, error, box])
    chatbot.clear(lambda: (TextChatSession(), ""), None, [state, error])


def documents_tab(app: TextDemoApp, model_job: dict) -> None:
    with gr.Tab("Documents", id="documents-tab", elem_id="documents-tab"):
        state = gr.State(DocSession())
        gr.Markdown("Upload PDF, TXT or Markdown files, then ask about them. The documents go in front of the "
                    "first question, as InternLM's file-chat demo does; defaults for long inputs: temperature "
                    "0.05, repetition penalty 1.02.")
        files = gr.File(label="Documents", file_count="multiple", file_types=sorted(DOC_SUFFIXES),
                        elem_id="doc-files")
        table = gr.Markdown(app.documents_table(DocSession()), elem_id="doc-table")
        error = gr.Markdown("", elem_id="doc-error")
        chatbot = gr.Chatbot(label="Questions about the documents", height=380, elem_id="doc-chatbot")
        box = gr.Textbox(placeholder="Ask about the documents", show_label=False, elem_id="doc-question", lines=1,
                         max_lines=8)
        with gr.Row():
            ask_btn = gr.Button("Ask", variant="primary", elem_id="doc-ask")
            clear = gr.Button("Clear", elem_id="doc-clear")
        opts = _options(app.doc_defaults, "doc")

    def upload(uploaded, st: DocSession):
        try:
            new = app.add_documents(uploaded, st)
        except Exception as e:
            return st, app.documents_table(st), _error_md(describe_error(e)), None
        return new, app.documents_table(new), "", None

    files.upload(upload, [files, state], [state, table, error, files])

    def ask(text, st: DocSession, *o):
        try:
            question = _question(text)
            options = app.chat_options(*o)
            turns = app.doc_turn(question, st, options)
            first = next(turns)  # the fit check runs before anything is shown
        except Exception as e:
            yield st.messages, st, gr.update(), _error_md(describe_error(e))
            return
        try:
            yield first[0], first[1], "", ""
            for messages, new in turns:
                yield messages, new, "", ""
        except Exception as e:
            yield st.messages, st, gr.update(value=text), _error_md(describe_error(e))

    box.submit(ask, [box, state, *opts], [chatbot, state, box, error], **model_job)
    ask_btn.click(ask, [box, state, *opts], [chatbot, state, box, error], **model_job)
    clear.click(lambda: ([], DocSession(), "", "", app.documents_table(DocSession()), None), None,
                [chatbot, state, error, box, table, files])
