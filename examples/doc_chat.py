"""Chat about your documents with any OpenAI-compatible server, as InternLM's long-context file chat
does (InternLM/InternLM `long_context/doc_chat_demo.py`, there a streamlit page in front of
`lmdeploy serve api_server`): upload PDF, TXT or Markdown files, ask, and read the streamed answer.

    python -m xcomposer serve --folder internlm/internlm2_5-7b-chat-1m --session-len 65536 --port 23333
    python examples/doc_chat.py --base-url http://127.0.0.1:23333/v1

The documents' text goes in front of the first question (`{documents}\\n\\n{question}`) and stays in
the conversation; later questions follow as plain user turns. Defaults follow InternLM's advice for
long inputs: temperature 0.05, repetition penalty 1.02 (sent as the `repetition_penalty` extension
that our server, vLLM and LMDeploy accept), top-p 1.0, 1024 new tokens.
"""
from __future__ import annotations

import argparse
import html
import os
from pathlib import Path

import gradio as gr
from openai import OpenAI, OpenAIError

from xcomposer.serve.documents import LONG_INPUT_DEFAULTS, DocumentError, read_document, with_documents

MAX_DOCUMENTS = 8


def _model_name(client: OpenAI, wanted: str | None) -> str:
    if wanted:
        return wanted
    models = client.models.list().data
    if not models:
        raise SystemExit("error: the server lists no models; pass --model NAME")
    return models[0].id


def build_page(client: OpenAI, model: str) -> gr.Blocks:
    d = LONG_INPUT_DEFAULTS

    def on_upload(files, state):
        docs = []
        try:
            for f in (files or [])[:MAX_DOCUMENTS + 1]:
                path = f if isinstance(f, str) else f.path
                docs.append(read_document(path, Path(getattr(f, "orig_name", None) or path).name))
            if len(docs) > MAX_DOCUMENTS:
                raise DocumentError(f"upload at most {MAX_DOCUMENTS} documents at a time")
        except DocumentError as e:
            return state, f'<span class="dc-error">Error: {html.escape(str(e))}</span>', state["messages"]
        names = ", ".join(f"{x.name} ({len(x.text):,} characters)" for x in docs) or "none"
        return {"documents": docs, "messages": [], "api": []}, f"Documents: {html.escape(names)}", []

    def ask(question, state, max_tokens, temperature, top_p, penalty):
        question = (question or "").strip()
        if not question:
            yield state["messages"], state, "", '<span class="dc-error">Error: type a question</span>'
            return
        first = not state["api"]
        content = with_documents(question, state["documents"]) if first else question
        api = state["api"] + [{"role": "user", "content": content}]
        shown = state["messages"] + [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        yield shown, state, "", ""
        answer = ""
        try:
            stream = client.chat.completions.create(
                model=model, messages=api, stream=True, max_tokens=int(max_tokens), temperature=float(temperature),
                top_p=float(top_p), extra_body={"repetition_penalty": float(penalty)})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    answer += chunk.choices[0].delta.content
                    shown[-1] = {"role": "assistant", "content": answer}
                    yield shown, state, "", ""
        except OpenAIError as e:  # the server's own message (e.g. a document too long for its window)
            message = getattr(e, "message", None) or str(e)
            yield state["messages"], state, question, f'<span class="dc-error">Error: {html.escape(message)}</span>'
            return
        new = {"documents": state["documents"], "messages": shown,
               "api": api + [{"role": "assistant", "content": answer}]}
        yield shown, new, "", ""

    with gr.Blocks(title="Document chat", analytics_enabled=False) as page:
        gr.Markdown(f"# Document chat\nModel `{html.escape(model)}`. Upload PDF, TXT or Markdown files, then ask.")
        state = gr.State({"documents": [], "messages": [], "api": []})
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Documents", file_count="multiple", file_types=[".pdf", ".txt", ".md"],
                                elem_id="dc-upload")
                listing = gr.Markdown("Documents: none", elem_id="dc-list")
                max_tokens = gr.Slider(16, 4096, value=d["max_new_tokens"], step=16, label="Max new tokens")
                temperature = gr.Slider(0.0, 1.0, value=d["temperature"], step=0.01, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=d["top_p"], step=0.05, label="Top-p")
                penalty = gr.Slider(0.8, 1.2, value=d["repetition_penalty"], step=0.001, label="Repetition penalty")
            with gr.Column(scale=2):
                chat = gr.Chatbot(height=440, elem_id="dc-chatbot")
                error = gr.Markdown("", elem_id="dc-error")
                question = gr.Textbox(placeholder="Ask about the documents", show_label=False, elem_id="dc-question")
                send = gr.Button("Ask", variant="primary", elem_id="dc-ask")
        files.upload(on_upload, [files, state], [state, listing, chat])
        inputs, outputs = [question, state, max_tokens, temperature, top_p, penalty], [chat, state, question, error]
        send.click(ask, inputs, outputs)
        question.submit(ask, inputs, outputs)
    return page


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", "--base_url", dest="base_url", required=True,
                   help="the server's OpenAI API root, e.g. http://127.0.0.1:23333/v1")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"),
                   help="the server's key (default: $OPENAI_API_KEY, else none)")
    p.add_argument("--model", default=None, help="model name (default: the first the server lists)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=12000)
    try:
        model = _model_name(client, args.model)
    except OpenAIError as e:
        raise SystemExit(f"error: cannot reach the server at {args.base_url}: {e}") from None
    build_page(client, model).queue().launch(server_name=args.host, server_port=args.port, ssr_mode=False,
                                             css=".dc-error {color:#b00020}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
