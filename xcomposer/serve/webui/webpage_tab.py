"""The web-page tab (XComposer2.5): an instruction, a resume in markdown, or a screenshot in; upstream's
`write_webpage` / `resume_2_webpage` / `screen_2_webpage` with the web LoRA; the page shown in a
sandboxed iframe (scripts run in an opaque origin: no access to this page, its cookies or its
storage) and offered as a download (saved atomically in the session's folder first)."""
from __future__ import annotations

import html as html_lib

import gradio as gr

from .app import WEBPAGE_DEFAULTS, DemoApp, UserError, _error_md, describe_error

KINDS = {"From an instruction": "instruction", "From a resume (markdown)": "resume",
         "From a screenshot": "screenshot"}


def preview(page: str) -> str:
    """The page inside an iframe whose `sandbox` allows scripts only (no same-origin, forms, popups,
    top navigation): what the model wrote cannot reach the demo."""
    return (f'<iframe sandbox="allow-scripts" referrerpolicy="no-referrer" title="generated page" '
            f'style="width:100%;height:640px;border:1px solid #ccc" srcdoc="{html_lib.escape(page, quote=True)}">'
            f'</iframe>')


def webpage_tab(app: DemoApp, model_job: dict) -> None:
    wd = WEBPAGE_DEFAULTS
    with gr.Tab("Web page", id="webpage-tab", elem_id="webpage-tab"):
        with gr.Row():
            with gr.Column(scale=1):
                kind = gr.Radio(list(KINDS), value="From an instruction", label="Make a page",
                                elem_id="webpage-kind")
                text = gr.Textbox(lines=8, label="Instruction, or the resume in markdown", elem_id="webpage-text",
                                  placeholder="A website for a research institute: a blue navigation bar, the "
                                              "logo on the left, the mission below, pictures of its projects.")
                upload = gr.File(label="Screenshot (an image), or the resume as a .md file", file_count="single",
                                 file_types=["image", ".md", ".txt"], elem_id="webpage-upload")
                with gr.Accordion("Generation options", open=False):
                    w_max = gr.Slider(64, 8192, value=wd["max_new_tokens"], step=1, label="Max new tokens",
                                      elem_id="webpage-max-tokens")
                    w_beams = gr.Slider(1, 4, value=wd["num_beams"], step=1, label="Beams", elem_id="webpage-beams")
                    w_pen = gr.Slider(1.0, 5.0, value=wd["repetition_penalty"], step=0.05,
                                      label="Repetition penalty", elem_id="webpage-penalty")
                    w_seed = gr.Number(wd["seed"], label="Random seed (empty: a new draw each time)", precision=0,
                                       elem_id="webpage-seed")
                go = gr.Button("Write the page", variant="primary", elem_id="webpage-go")
                error = gr.Markdown("", elem_id="webpage-error")
                download = gr.DownloadButton("Download the page (.html)", interactive=False,
                                             elem_id="webpage-download")
            with gr.Column(scale=2):
                shown = gr.HTML("", elem_id="webpage-preview")

    def write(kind_label, text_value, file, max_new, beams, penalty, seed, request: gr.Request):
        try:
            kind_name = KINDS.get(kind_label)
            if kind_name is None:
                raise UserError(f"choose one of {', '.join(KINDS)}")
            refs: list[str] = []
            if file is not None:
                path = file if isinstance(file, str) else getattr(file, "name", None) or file.get("path")
                if str(path).lower().endswith((".md", ".txt")):
                    if kind_name != "resume":
                        raise UserError("a .md or .txt file is a resume: choose 'From a resume (markdown)'")
                    with open(path, encoding="utf-8") as f:
                        text_value = f.read()
                else:
                    refs, _ = app.store_uploads([path], request.session_hash)
            options = {"max_new_tokens": int(max_new), "num_beams": int(beams), "repetition_penalty": float(penalty)}
            if seed not in (None, ""):
                options["seed"] = int(seed)
            page, saved = app.web_page(kind_name, text_value, refs, options, request.session_hash)
        except Exception as e:
            return gr.update(), gr.update(), _error_md(describe_error(e))
        return preview(page), gr.update(value=saved, interactive=True), ""

    go.click(write, [kind, text, upload, w_max, w_beams, w_pen, w_seed], [shown, download, error], **model_job)


__all__ = ["webpage_tab", "preview", "KINDS"]
