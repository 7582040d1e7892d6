"""The chat tab: several images and a question per message, streamed answers, multi-turn history per
browser session, regenerate, clear, and the generation options."""
from __future__ import annotations

import gradio as gr

from ...llm.tokenizer import check_text
from .app import MAX_QUESTION_CHARS, ChatSession, DemoApp, UserError, _error_md, describe_error, without_surrogates


def dropped_note(new: ChatSession, before: ChatSession) -> str:
    """Once a reply is complete: a note when its prompt left out the oldest exchanges (the page still
    shows them; the model did not read them)."""
    if new is before or not new.dropped:
        return ""
    return (f'<span class="xc-note">The conversation outgrew what the model reads at once: it left out the '
            f'{new.dropped} oldest exchange(s) for this reply (they are still shown here). Press Clear to start '
            f'afresh.</span>')


def chat_tab(app: DemoApp, model_job: dict) -> None:
    """Lay out the tab inside the open `gr.Blocks` and wire its handlers; `model_job` holds the queue
    options for handlers that use the model."""
    hd = app.chat_defaults
    with gr.Tab("Chat", id="chat-tab", elem_id="chat-tab"):
        chat_state = gr.State(ChatSession())
        chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot")
        chat_error = gr.Markdown("", elem_id="chat-error")
        chat_in = gr.MultimodalTextbox(file_types=["image", "video"] if app.xcomposer2d5 else ["image"],
                                       file_count="multiple",
                                       placeholder="Upload images or a video and ask a question" if app.xcomposer2d5
                                       else "Upload images and ask a question" if app.vision
                                       else "Ask a question",
                                       elem_id="chat-input", show_label=False)
        with gr.Row():
            regen = gr.Button("Regenerate", elem_id="chat-regenerate")
            clear = gr.Button("Clear", elem_id="chat-clear")
        with gr.Accordion("Generation options", open=False):
            c_max = gr.Slider(1, 2048, value=hd["max_new_tokens"], step=1, label="Max new tokens",
                              elem_id="chat-max-tokens")
            c_beams = gr.Slider(1, 5, value=hd["num_beams"], step=1, label="Beams", elem_id="chat-beams")
            c_pen = gr.Slider(1.0, 5.0, value=hd["repetition_penalty"], step=0.05,
                              label="Repetition penalty", elem_id="chat-penalty")
            c_sample = gr.Checkbox(hd["do_sample"], label="Sampling", elem_id="chat-sample")
            c_temp = gr.Slider(0.05, 2.0, value=hd["temperature"], step=0.05, label="Temperature",
                               elem_id="chat-temperature")
            c_top_p = gr.Slider(0.05, 1.0, value=hd["top_p"], step=0.05, label="Top-p",
                                elem_id="chat-top-p")
    chat_opts = [c_max, c_beams, c_pen, c_sample, c_temp, c_top_p]

    def ask(message, state: ChatSession, max_new, n_beams, pen, do_sample, temp, top_p, request: gr.Request):
        opts = (max_new, n_beams, pen, do_sample, temp, top_p)
        message = message or {}
        text = (message.get("text") or "").strip()
        files = message.get("files") or []
        try:
            check_text(text, "the question")
            if not text:
                raise UserError("type a question (images alone are not a question)")
            if len(text) > MAX_QUESTION_CHARS:
                raise UserError(f"the question is {len(text)} characters; keep it under {MAX_QUESTION_CHARS}")
            refs, shown = app.store_uploads(files, request.session_hash)
            options = app.chat_options(*opts)
        except Exception as e:
            yield state.messages, state, gr.update(), _error_md(describe_error(e))
            return
        try:
            for messages, new in app.chat_turn(text, refs, shown, state, options):
                yield messages, new, {"text": "", "files": []}, dropped_note(new, state)
        except Exception as e:
            yield state.messages, state, gr.update(value=without_surrogates(message)), _error_md(describe_error(e))

    chat_in.submit(ask, [chat_in, chat_state, *chat_opts], [chatbot, chat_state, chat_in, chat_error],
                   **model_job)

    def regenerate(state: ChatSession, max_new, n_beams, pen, do_sample, temp, top_p):
        opts = (max_new, n_beams, pen, do_sample, temp, top_p)
        try:
            text, refs, shown, previous = app.regenerate_turn(state)
        except ValueError as e:
            yield state.messages, state, _error_md(str(e))
            return
        try:
            options = app.chat_options(*opts)
            for messages, new in app.chat_turn(text, refs, shown, previous, options):
                yield messages, new, dropped_note(new, previous)
        except Exception as e:
            yield state.messages, state, _error_md(describe_error(e))

    regen.click(regenerate, [chat_state, *chat_opts], [chatbot, chat_state, chat_error], **model_job)
    clear.click(lambda: ([], ChatSession(), "", {"text": "", "files": []}), None,
                [chatbot, chat_state, chat_error, chat_in])
    chatbot.clear(lambda: (ChatSession(), ""), None, [chat_state, chat_error])  # the chatbot's own bin icon
