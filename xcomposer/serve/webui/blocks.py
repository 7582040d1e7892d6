"""The web demo's page, queued and served by `launch`: composition and chat for an InternLM-XComposer
(1.0 or 2);
chat and documents for a text-only InternLM (composition needs the vision model, so its tab is left
out with a note)."""
from __future__ import annotations

import gradio as gr

from .app import CSS, DemoApp
from .chat_tab import chat_tab
from .compose_tab import compose_tab
from .documents_tab import documents_tab
from .webpage_tab import webpage_tab

TEXT_ONLY_NOTE = ("This model reads text only: chat with it, or ask about your documents. Writing illustrated "
                  "articles and questions about images need an InternLM-XComposer checkpoint (`--folder "
                  "internlm/internlm-xcomposer-7b`).")


def build_app(app: DemoApp):
    """The gradio Blocks for `app`; call `.queue(...)` / `.launch(...)` via `launch`."""
    model_job = dict(concurrency_limit=app.max_concurrency, concurrency_id="model")
    # chats share the batching engine's rows (beam-search chats wait for the model lock inside)
    chat_job = model_job if app.engine is None else dict(concurrency_limit=app.engine.rows, concurrency_id="chat")
    with gr.Blocks(title="InternLM-XComposer" if app.vision else "InternLM", analytics_enabled=False) as demo:
        if app.banner:
            gr.Markdown(app.banner, elem_id="demo-banner")
        if app.vision:
            gr.Markdown("# InternLM-XComposer2.5\nWrite illustrated articles and web pages, or chat about images "
                        "and videos." if app.xcomposer2d5 else
                        "# InternLM-XComposer2\nWrite illustrated articles from an instruction (with your own "
                        "images if you like), or chat about images." if app.xcomposer2 else
                        "# InternLM-XComposer\nWrite illustrated articles from a title, or chat about images.")
        else:
            gr.Markdown(f"# InternLM\n{TEXT_ONLY_NOTE}", elem_id="text-only-note")
        with gr.Tabs():
            if app.vision:
                compose_tab(app, model_job)  # each generation's own composition prompts
                chat_tab(app, chat_job)
                if app.xcomposer2d5:
                    webpage_tab(app, model_job)
            else:
                chat_tab(app, chat_job)
                documents_tab(app, chat_job)
    return demo


def launch(app: DemoApp, *, host: str = "127.0.0.1", port: int = 6006, max_file_size: str = "25mb",
           prevent_thread_lock: bool = False):
    """Build, queue and serve the demo. Only the image library is served by path."""
    demo = build_app(app)
    demo.queue(default_concurrency_limit=app.max_concurrency, max_size=64)
    allowed = [str(app.library.root)] if app.library is not None else []
    demo.launch(server_name=host, server_port=port, allowed_paths=allowed, blocked_paths=[str(app.out_root)],
                max_file_size=max_file_size, show_error=True, ssr_mode=False, css=CSS,
                prevent_thread_lock=prevent_thread_lock, quiet=False)
    return demo
