"""The web demo's page: the two tabs in one `gr.Blocks`, queued and served by `launch`."""
from __future__ import annotations

import gradio as gr

from .app import CSS, DemoApp
from .chat_tab import chat_tab
from .compose_tab import compose_tab


def build_app(app: DemoApp):
    """The gradio Blocks for `app`; call `.queue(...)` / `.launch(...)` via `launch`."""
    model_job = dict(concurrency_limit=app.max_concurrency, concurrency_id="model")
    if getattr(app, "text_only", False):  # an InternLM chat model: chat and documents, no composition
        return _text_page(app, model_job)
    with gr.Blocks(title="InternLM-XComposer", analytics_enabled=False) as demo:
        if app.banner:
            gr.Markdown(app.banner, elem_id="demo-banner")
        gr.Markdown("# InternLM-XComposer\nWrite illustrated articles from a title, or chat about images.")
        with gr.Tabs():
            compose_tab(app, model_job)
            chat_tab(app, model_job)
    return demo


def _text_page(app, model_job: dict):
    from .text_tabs import documents_tab, text_chat_tab

    with gr.Blocks(title=f"{app.family} chat", analytics_enabled=False) as demo:
        if app.banner:
            gr.Markdown(app.banner, elem_id="demo-banner")
        gr.Markdown(f"# {app.family} chat\nChat, or ask about your documents (context window: {app.window} "
                    f"tokens).\n\n*The composition and image-chat tabs need an InternLM-XComposer model; this "
                    f"folder holds a text-only model, so they are left out.*", elem_id="text-only-note")
        with gr.Tabs():
            text_chat_tab(app, model_job)
            documents_tab(app, model_job)
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
