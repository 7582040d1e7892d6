"""The composition tab: a title (XComposer2: an instruction, optionally with reference images) in, an
illustrated article out (streamed), then editing: pick another candidate, edit a caption and search
again, remove or add an image, rewrite a paragraph, upstream XComposer2's paragraph edits (rewrite,
expand, abbreviate, insert before/after: the model proposes, the user may change the text, then
applies it), download a zip. Every edit runs on the session's own article and saves it; a failed
edit leaves it as it was."""
from __future__ import annotations

import gradio as gr

from ...compose.article import Article
from ...compose.pipeline import short_title
from ...compose.prompts import EDIT_KINDS
from ...llm.tokenizer import check_text
from .app import (MAX_INSTRUCTION_CHARS, MAX_REFERENCES, MAX_TITLE_CHARS, ComposeSession, DemoApp, UserError,
                  _error_md, _paragraph, describe_error)

# upstream's edit names (gradio_demo_composition.py's radio) -> ours
EDIT_CHOICES = [("rewrite", "rewrite"), ("expand", "expand"), ("abbreviate", "abbreviate"),
                ("insert a paragraph before", "insert_before"), ("insert a paragraph after", "insert_after")]
EDIT_NAMES = {k: name for name, k in EDIT_CHOICES}
EDIT_DONE = {"rewrite": "rewritten", "expand": "expanded", "abbreviate": "abbreviated",
             "insert_before": "new paragraph inserted before it", "insert_after": "new paragraph inserted after it"}
assert [k for _, k in EDIT_CHOICES] == list(EDIT_KINDS)
# upstream's example instruction (its textbox's default value), shortened
INSTRUCTION_EXAMPLE = "根据以下标题：“中国水墨画：流动的诗意与东方美学”，创作长文章，字数不少于800字。请结合以下文本素材：…"


def compose_tab(app: DemoApp, model_job: dict) -> None:
    """Lay out the tab inside the open `gr.Blocks` and wire its handlers; `model_job` holds the queue
    options for handlers that use the model."""
    cd = app.compose_defaults
    v2 = app.xcomposer2
    with gr.Tab("Compose", id="compose-tab", elem_id="compose-tab"):
        compose_state = gr.State(ComposeSession())
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                if v2:
                    title = gr.Textbox(label="Instruction (a title, material, length; any language)",
                                       placeholder=INSTRUCTION_EXAMPLE, elem_id="title", lines=5, max_lines=12)
                else:
                    title = gr.Textbox(label="Title", placeholder="e.g. 春天的西湖 / A weekend in Kyoto",
                                       elem_id="title", max_lines=2)
                references = gr.File(label=f"Your images (optional, at most {MAX_REFERENCES}): the model writes "
                                           f"with them and places them", file_count="multiple", file_types=["image"],
                                     elem_id="references", visible=v2)
                with gr.Row():
                    num_images = gr.Slider(0, 15 if v2 else 10, value=cd["num_images"], step=1,
                                           label="Number of images", elem_id="num-images")
                    model_decides = gr.Checkbox(False, label="Let the model decide how many",
                                                elem_id="model-decides")
                text_len = gr.Slider(20, 4096 if v2 else 2000, value=cd["max_new_tokens"], step=10,
                                     label="Text length (new tokens)", elem_id="text-length")
                beams = gr.Slider(1, 6 if v2 else 5, value=cd["num_beams"], step=1, label="Beams", elem_id="beams")
                penalty = gr.Slider(1.0, 2.0 if v2 else 10.0, value=cd["repetition_penalty"], step=0.001 if v2 else 0.1,
                                    label="Repetition penalty", elem_id="penalty")
                sample = gr.Checkbox(cd["do_sample"], label="Sampling", elem_id="sample")
                with_meta = gr.Checkbox(bool(cd.get("with_meta", False)), label="With meta instruction (system turn)",
                                        elem_id="with-meta", visible=v2)
                seed = gr.Number(cd.get("seed"), label="Random seed (empty: a new draw each time)", precision=0,
                                 elem_id="seed", visible=v2)
                lang = gr.Radio([("中文 prompts", "zh"), ("English prompts", "en")], value="zh",
                                label="Prompt language", elem_id="lang", visible=not v2)
                compose_btn = gr.Button("Write the article", variant="primary", elem_id="compose-btn")
                status = gr.Markdown("", elem_id="compose-status")
                download = gr.DownloadButton("Download article (zip)", interactive=False,
                                             elem_id="download-article")
            with gr.Column(scale=2, min_width=360):
                article_view = gr.HTML(app.render(None), elem_id="article")
            with gr.Column(scale=1, min_width=260):
                gr.Markdown("### Edit the article")
                slot_pick = gr.Dropdown(choices=[], value=None, label="Image", elem_id="slot-pick",
                                        interactive=True)
                gallery = gr.Gallery(label="Candidates (click one to use it)", columns=2, height=260,
                                     allow_preview=False, elem_id="candidates", interactive=False)
                caption = gr.Textbox(label="Caption", elem_id="caption-edit", max_lines=3)
                with gr.Row():
                    search_btn = gr.Button("Search again", elem_id="search-again")
                    remove_btn = gr.Button("Remove image", elem_id="remove-image")
                para_pick = gr.Dropdown(choices=[], value=None, label="Paragraph", elem_id="paragraph-pick",
                                        interactive=True)
                with gr.Row():
                    add_btn = gr.Button("Add an image here", elem_id="add-image")
                    regen_btn = gr.Button("Rewrite paragraph", elem_id="regenerate-paragraph")
                edit_kind = gr.Radio(EDIT_CHOICES, value="rewrite", label="Paragraph edit", elem_id="edit-kind")
                edit_inst = gr.Textbox(label="Material (rewrite, expand) or outline (insert)", max_lines=4,
                                       elem_id="edit-instruction")
                propose_btn = gr.Button("Ask the model", elem_id="propose-edit")
                edit_text = gr.Textbox(label="After editing (change it freely; an empty rewrite deletes the "
                                             "paragraph)", lines=4, elem_id="edit-text")
                apply_btn = gr.Button("Apply the edit", elem_id="apply-edit")

    def editor(article: Article | None, paragraph: int | None = None):
        """Updates for the editing controls, focused on `paragraph` (or the first image)."""
        if article is None:
            return (gr.update(choices=[], value=None), [], "", gr.update(choices=[], value=None))
        slots = [(f"¶{s.paragraph}: {s.caption[:40] or '(no caption)'}", s.paragraph) for s in article.slots]
        par_focus = paragraph if paragraph is not None and 0 <= paragraph < len(article.paragraphs) else 0
        if paragraph is None or article.slot_at(paragraph) is None:
            paragraph = article.slots[0].paragraph if article.slots else None
        paras = [(f"¶{i}: {p[:40]}", i) for i, p in enumerate(article.paragraphs)]
        slot = article.slot_at(paragraph) if paragraph is not None else None
        return (gr.update(choices=slots, value=paragraph), app.candidates_view(article, paragraph),
                slot.caption if slot else "",
                gr.update(choices=paras, value=par_focus if paras else None))

    def finished(state: ComposeSession, note: str, paragraph: int | None = None):
        return (state, app.render(state.article), note,
                gr.update(value=state.zip_path, interactive=state.zip_path is not None),
                *editor(state.article, paragraph))

    compose_outputs = [compose_state, article_view, status, download, slot_pick, gallery, caption, para_pick]

    # refs_in, meta_box and seed_value came later (XComposer2): defaults keep an API client written
    # against the eight earlier parameters of /run_compose working (gradio offers them as optional)
    def run_compose(title_text, n_images, decides, length, n_beams, pen, do_sample, language, refs_in=None,
                    meta_box=False, seed_value=None, state=None, request: gr.Request = None):
        try:
            what = "the instruction" if v2 else "the title"
            limit = MAX_INSTRUCTION_CHARS if v2 else MAX_TITLE_CHARS
            title_text = check_text((title_text or "").strip(), what)
            if not title_text:
                raise UserError(f"type {'an instruction' if v2 else 'a title'} first")
            if len(title_text) > limit:
                raise UserError(f"{what} is {len(title_text)} characters; keep it under {limit}")
            gen = dict(max_new_tokens=int(length), num_beams=int(n_beams), repetition_penalty=float(pen),
                       do_sample=bool(do_sample))
            refs, seed_int = [], None
            if v2:
                refs, _ = app.store_uploads(refs_in or [], request.session_hash, limit=MAX_REFERENCES)
                seed_int = _seed(seed_value)
            composer = app.composer(language or "zh")
            count = None if decides else int(n_images)
            shown_title = short_title(title_text) if v2 else title_text

            def make():
                written = ""
                for ev in composer.run(title_text, num_images=count, images=refs or None, with_meta=bool(meta_box),
                                       seed=seed_int, **gen):
                    if ev.kind == "text":
                        written += ev.text
                        yield "text", app.render(None, streaming=written, title=shown_title), None
                    elif ev.kind == "stage":
                        yield "stage", None, f"{ev.stage}: {ev.done}/{ev.total}"
                    elif ev.kind == "done":
                        yield "done", ev.article, None

            shown = app.render(None)
            yield (state, shown, "Working: writing the text…", gr.update(), *([gr.update()] * 4))
            for kind, value, note in app.stream_locked(make):
                if kind == "text":
                    shown = value
                    yield (state, value, "Working: writing the text…", gr.update(), *([gr.update()] * 4))
                elif kind == "stage":
                    yield (state, shown, f"Working: {note}", gr.update(), *([gr.update()] * 4))
                else:
                    article = value
            new = app.save(ComposeSession(article=article), request.session_hash)
            placed = sum(1 for s in article.slots if s.chosen is not None)
            note = f"Done: {len(article.paragraphs)} paragraphs, {placed} images"
            if article.fallbacks:
                note += f" ({len(article.fallbacks)} notes under the article)"
            yield finished(new, note)
        except Exception as e:  # reported in the page; the app keeps serving
            yield (state, app.render(state.article), _error_md(describe_error(e)), gr.update(),
                   *([gr.update()] * 4))

    compose_inputs = [title, num_images, model_decides, text_len, beams, penalty, sample, lang, references, with_meta,
                      seed, compose_state]
    compose_btn.click(run_compose, compose_inputs, compose_outputs, **model_job)
    if not v2:  # a multi-line instruction takes Enter as a new line
        title.submit(run_compose, compose_inputs, compose_outputs, **model_job)

    def apply_edit(fn, locked: bool, state: ComposeSession, args: tuple, session_hash: str | None):
        """Run the edit `fn(state, *args) -> (message, paragraph)` (under the model lock if it uses
        the model), save, and refresh the page; an error leaves the article as it was."""
        if state.article is None:
            return (state, app.render(None), _error_md("write an article first"), gr.update(), *editor(None))
        before = state.article.to_dict()
        try:
            message, paragraph = app.call_locked(lambda: fn(state, *args)) if locked else fn(state, *args)
            return finished(app.save(state, session_hash), message, paragraph)
        except Exception as e:
            restored = Article.from_dict(before)
            restored._saved_dir = state.folder  # keeps the saved copies of images that moved
            state = ComposeSession(article=restored, folder=state.folder, zip_path=state.zip_path)
            return (state, app.render(restored), _error_md(describe_error(e)), gr.update(), *editor(restored))

    def focus(state: ComposeSession, paragraph):
        article = state.article
        if article is None or paragraph is None:
            return [], "", gr.update()
        slot = article.slot_at(int(paragraph))
        return (app.candidates_view(article, int(paragraph)), slot.caption if slot else "",
                gr.update(value=int(paragraph)))

    slot_pick.input(focus, [compose_state, slot_pick], [gallery, caption, para_pick])

    def choose(state: ComposeSession, paragraph, evt: gr.SelectData):
        p = _paragraph(paragraph, state.article, "an image")
        if evt is None or not isinstance(getattr(evt, "index", None), int):
            raise UserError("click one of the candidate pictures to choose it")
        state.article.choose(p, int(evt.index), by="user")
        return f"paragraph {p}: candidate {int(evt.index) + 1} chosen", p

    def on_select(state: ComposeSession, paragraph, evt: gr.SelectData, request: gr.Request):
        return apply_edit(choose, False, state, (paragraph, evt), request.session_hash)

    # a click carries its SelectData; no API client can send one, so the endpoint is not offered to them
    gallery.select(on_select, [compose_state, slot_pick], compose_outputs, api_visibility="private")

    def search_again(state: ComposeSession, paragraph, text):
        p = _paragraph(paragraph, state.article, "an image")
        text = check_text((text or "").strip(), "the caption")
        if not text:
            raise UserError("the caption is empty; type what the picture should show")
        if app.library is None:
            state.article.set_caption(p, text, source="user")
            return f"paragraph {p}: caption changed (no image library to search)", p
        found = app.composer(state.article.lang).set_caption(state.article, p, text)
        return f"paragraph {p}: {len(found)} new candidates for the caption", p

    def on_search(state: ComposeSession, paragraph, text, request: gr.Request):
        return apply_edit(search_again, True, state, (paragraph, text), request.session_hash)

    search_btn.click(on_search, [compose_state, slot_pick, caption], compose_outputs, **model_job)
    caption.submit(on_search, [compose_state, slot_pick, caption], compose_outputs, **model_job)

    def remove(state: ComposeSession, paragraph):
        p = _paragraph(paragraph, state.article, "an image")
        state.article.remove_image(p)
        return f"paragraph {p}: image removed", p  # "add an image here" would put one back

    def on_remove(state: ComposeSession, paragraph, request: gr.Request):
        return apply_edit(remove, False, state, (paragraph,), request.session_hash)

    remove_btn.click(on_remove, [compose_state, slot_pick], compose_outputs)

    def add(state: ComposeSession, paragraph):
        p = _paragraph(paragraph, state.article, "a paragraph")
        if state.article.slot_at(p) is not None:
            raise UserError(f"paragraph {p} already has an image; choose another paragraph")
        app.composer(state.article.lang).add_image(state.article, p)
        return f"paragraph {p}: image added", p

    def on_add(state: ComposeSession, paragraph, request: gr.Request):
        return apply_edit(add, True, state, (paragraph,), request.session_hash)

    add_btn.click(on_add, [compose_state, para_pick], compose_outputs, **model_job)

    def rewrite(state: ComposeSession, paragraph, length, pen):
        p = _paragraph(paragraph, state.article, "a paragraph")
        room = max(20, min(int(length), 400))
        app.composer(state.article.lang).regenerate_paragraph(state.article, p, max_new_tokens=room,
                                                              repetition_penalty=float(pen))
        return f"paragraph {p}: rewritten", p

    def on_rewrite(state: ComposeSession, paragraph, length, pen, request: gr.Request):
        return apply_edit(rewrite, True, state, (paragraph, length, pen), request.session_hash)

    regen_btn.click(on_rewrite, [compose_state, para_pick, text_len, penalty], compose_outputs, **model_job)

    def propose(state: ComposeSession, paragraph, kind, instruction):
        """The model's text for the edit, shown for the user to change; the article is not touched."""
        try:
            p = _paragraph(paragraph, state.article, "a paragraph")
            if kind not in EDIT_KINDS:
                raise UserError("choose the kind of edit first")
            text = app.call_locked(lambda: app.composer(state.article.lang).propose_edit(
                state.article, p, kind, instruction or ""))
            return text, (f"paragraph {p}: the model's {EDIT_NAMES[kind]} is below; change it if you like, "
                          f"then apply it")
        except Exception as e:
            return gr.update(), _error_md(describe_error(e))

    propose_btn.click(propose, [compose_state, para_pick, edit_kind, edit_inst], [edit_text, status], **model_job)

    def apply_text(state: ComposeSession, paragraph, kind, text):
        p = _paragraph(paragraph, state.article, "a paragraph")
        if kind not in EDIT_KINDS:
            raise UserError("choose the kind of edit first")
        where = app.composer(state.article.lang).apply_edit(state.article, p, kind, text or "")
        if where is None:
            return f"paragraph {p}: deleted", max(0, p - 1)
        return f"paragraph {p}: {EDIT_DONE[kind]}", where

    def on_apply(state: ComposeSession, paragraph, kind, text, request: gr.Request):
        return apply_edit(apply_text, False, state, (paragraph, kind, text), request.session_hash)

    apply_btn.click(on_apply, [compose_state, para_pick, edit_kind, edit_text], compose_outputs)


def _seed(value) -> int | None:
    """The seed box's value: empty is no seed; anything else a whole number."""
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise UserError(f"the seed {value!r} is not a number; type a whole number or leave it empty") from None
    if f != f or f in (float("inf"), float("-inf")) or f != int(f):
        raise UserError(f"the seed {value!r} must be a whole number, or empty")
    return int(f)
