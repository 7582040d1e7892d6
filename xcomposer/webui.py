"""The gradio web demo: an interleaved-composition tab and a multimodal chat tab.

`web_demo.py` parses the command line and calls `build_app`; everything else lives here so it can
be tested. Design points:

* Per-session state lives in `gr.State` (chat history, the current article); each session writes
  into its own folder `OUT/<session>/`, named from gradio's random session hash after sanitising.
* The model keeps its KV caches on itself, so one generation runs at a time: model work happens in
  a worker thread holding `DemoApp.lock`, and page handlers consume its results through a queue.
  A page that goes away stops its job at the next piece (the worker notices) instead of leaving
  the lock held.
* Files: only the image library is in gradio's `allowed_paths`. Article pictures are embedded in
  the page as data URIs, downloads are copied to a private temporary folder before gradio takes
  them, so nothing under OUT is ever served by path. Every path is built from sanitised names,
  never from user text.
* Uploads go through `vision.image.load_image` (format, size, mode checks) and are stored as PNG in
  the session folder; a bad upload is reported in the page and changes nothing else.
"""
from __future__ import annotations

import hashlib
import html
import logging
import queue
import re
import shutil
import tempfile
import threading
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import gradio as gr

from vision.image import ImageError, load_image, to_data_uri

from .compose.article import Article, safe_folder_name

log = logging.getLogger("xcomposer.webui")

# upstream web_demo defaults (InternLM-XComposer-1.0/examples/web_demo.py): composition with 5 beams,
# repetition penalty 5.0, text length 1000 and 5 images; chat with 512 new tokens, 3 beams,
# repetition penalty 1.0 and sampling on
COMPOSE_DEFAULTS = dict(max_new_tokens=1000, num_beams=5, repetition_penalty=5.0, do_sample=False, num_images=5)
CHAT_DEFAULTS = dict(max_new_tokens=512, num_beams=3, repetition_penalty=1.0, do_sample=True, temperature=1.0,
                     top_p=1.0)
MAX_TITLE_CHARS = 500
MAX_QUESTION_CHARS = 8000
MAX_UPLOADS = 8
THUMB_SIDE = 512
DEMO_BANNER = ("**Demo mode.** This page runs a tiny, randomly initialised model built on the fly: its text, "
               "captions and choices are noise. It is here to try the interface; start `web_demo.py` with "
               "`--folder` pointing at real weights for real output.")
_SESSION_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class UserError(ValueError):
    """A request the page refuses; the message tells the user what to change."""


# -- paths -------------------------------------------------------------------------------------

def session_key(session_hash: str | None) -> str:
    """A folder name for a browser session: gradio's hash when it is plain, else a digest of it."""
    text = session_hash or ""
    if _SESSION_RE.fullmatch(text):
        return text
    return "s-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def session_dir(root: str | Path, session_hash: str | None) -> Path:
    root = Path(root).resolve()
    folder = root / session_key(session_hash)
    if folder.parent != root:  # cannot happen with the names above; kept as the invariant
        raise UserError("invalid session")
    return folder


def article_dir(root: str | Path, session_hash: str | None, title: str, article_id: str) -> Path:
    """`root/<session>/<sanitised title>-<id prefix>`: always directly inside the session folder,
    and distinct for distinct articles, whatever the title holds."""
    base = session_dir(root, session_hash)
    suffix = re.sub(r"[^0-9a-f]", "", (article_id or "").lower())[:8] or uuid.uuid4().hex[:8]
    folder = base / f"{safe_folder_name(title or '', 60)}-{suffix}"
    if folder.parent != base:
        raise UserError("the title cannot be used as a folder name")
    return folder


# -- session state -------------------------------------------------------------------------------

@dataclass
class ChatSession:
    history: list[dict[str, Any]] = field(default_factory=list)   # the model's turns
    messages: list[dict[str, Any]] = field(default_factory=list)  # what the chatbot shows
    last: tuple[str, list[str], list[str]] | None = None           # last question: text, model refs, shown files


@dataclass
class ComposeSession:
    article: Article | None = None
    folder: Path | None = None
    zip_path: str | None = None


class DemoApp:
    """The model, the library and the output root, shared by all sessions; handlers take the
    session's state and return its new value."""

    def __init__(self, model, library=None, out_root: str | Path = "web_demo_output", *, banner: str | None = None,
                 max_concurrency: int = 1, compose_defaults: dict | None = None, chat_defaults: dict | None = None):
        self.model = model
        self.library = library
        self.out_root = Path(out_root).resolve()
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.banner = banner
        self.max_concurrency = max_concurrency
        self.compose_defaults = {**COMPOSE_DEFAULTS, **(compose_defaults or {})}
        self.chat_defaults = {**CHAT_DEFAULTS, **(chat_defaults or {})}
        self.lock = threading.Lock()
        self.download_root = Path(tempfile.mkdtemp(prefix="xcomposer-downloads-"))
        self._thumbs: OrderedDict[tuple, str] = OrderedDict()

    # -- running model work ------------------------------------------------------------------
    def stream_locked(self, make: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        """Run `make()` and iterate it in a worker thread that holds the model lock; yield its items
        here. If this generator is closed early, the worker stops after its current item."""
        q: queue.Queue = queue.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                with self.lock:
                    for item in make():
                        q.put(("item", item))
                        if stop.is_set():
                            break
                q.put(("done", None))
            except BaseException as e:  # handed to the page's thread, which reports it
                q.put(("error", e))

        threading.Thread(target=work, name="xcomposer-job", daemon=True).start()
        try:
            while True:
                kind, value = q.get()
                if kind == "item":
                    yield value
                elif kind == "done":
                    return
                else:
                    raise value
        finally:
            stop.set()

    def call_locked(self, fn: Callable[[], Any]) -> Any:
        for value in self.stream_locked(lambda: iter([fn()])):
            return value

    # -- chat ----------------------------------------------------------------------------------
    def chat_options(self, max_new_tokens, num_beams, repetition_penalty, do_sample, temperature, top_p) -> dict:
        opts = dict(max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
                    repetition_penalty=float(repetition_penalty), do_sample=bool(do_sample))
        if do_sample:
            opts.update(temperature=float(temperature), top_p=float(top_p))
        return opts

    def store_uploads(self, files: list[Any], session_hash: str | None) -> tuple[list[str], list[str]]:
        """Validate uploaded files and keep a PNG copy of each in the session folder; returns
        (paths for the model, paths to show). Any bad file refuses the whole message."""
        paths = [_upload_path(f) for f in files or []]
        if len(paths) > MAX_UPLOADS:
            raise UserError(f"{len(paths)} images in one message; send at most {MAX_UPLOADS}")
        folder = session_dir(self.out_root, session_hash) / "uploads"
        pictures = []
        for i, p in enumerate(paths):
            try:
                pictures.append(load_image(p))
            except ImageError as e:
                which = f"image {i + 1} of {len(paths)}" if len(paths) > 1 else "the image"
                raise UserError(f"{which} ({Path(p).name}) cannot be used: {e.reason}") from e
        folder.mkdir(parents=True, exist_ok=True)
        stored = []
        for picture in pictures:
            dest = folder / f"{uuid.uuid4().hex}.png"
            picture.save(dest)
            stored.append(str(dest))
        return stored, paths

    def chat_turn(self, text: str, refs: list[str], shown: list[str], state: ChatSession,
                  options: dict) -> Iterator[tuple[list[dict], ChatSession]]:
        """Stream one turn: yields (messages to show, state); the state changes only when the
        reply is complete."""
        user_content: list[Any] = [{"path": p} for p in shown]
        if text:
            user_content.append(text)
        messages = state.messages + [{"role": "user", "content": user_content},
                                     {"role": "assistant", "content": ""}]
        yield messages, state
        history = state.history

        def make():
            stream = self.model.stream_chat(text, image=refs or None, history=history, **options)
            for piece in stream:
                yield ("piece", piece)
            yield ("history", stream.history)

        reply, new_history = "", None
        for kind, value in self.stream_locked(make):
            if kind == "piece":
                reply += value
                messages[-1] = {"role": "assistant", "content": reply}
                yield messages, state
            else:
                new_history = value
        if not reply.strip():
            messages[-1] = {"role": "assistant", "content": "(the model gave an empty reply)"}
        new = ChatSession(history=new_history, messages=messages, last=(text, refs, shown))
        yield messages, new

    # -- composition ---------------------------------------------------------------------------
    def composer(self, lang: str = "zh"):
        from .compose.pipeline import Composer

        return Composer(self.model, self.library, lang=lang)

    def thumb(self, path: str) -> str:
        """A data URI of a (downscaled) picture, cached by path, size and mtime."""
        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            return ""
        key = (str(p), st.st_mtime_ns, st.st_size)
        if key not in self._thumbs:
            try:
                self._thumbs[key] = to_data_uri(p, max_side=THUMB_SIDE)
            except ImageError:
                return ""
            while len(self._thumbs) > 256:
                self._thumbs.popitem(last=False)
        return self._thumbs[key]

    def render(self, article: Article | None, streaming: str | None = None, title: str = "") -> str:
        """The article as an HTML fragment with numbered paragraphs and embedded pictures."""
        e = html.escape
        if article is None:
            if not streaming:
                return '<div class="xc-article xc-empty">The article will appear here.</div>'
            paras = [p for p in re.split(r"\n\s*\n|\n", streaming) if p.strip()]
            body = "".join(f'<p class="xc-par" data-paragraph="{i}"><span class="xc-pn">¶{i}</span> {e(p)}</p>'
                           for i, p in enumerate(paras))
            return f'<div class="xc-article xc-writing"><h2>{e(title)}</h2>{body}</div>'
        parts = [f'<div class="xc-article"><h2>{e(article.title)}</h2>']
        for i, text in enumerate(article.paragraphs):
            parts.append(f'<p class="xc-par" data-paragraph="{i}"><span class="xc-pn">¶{i}</span> {e(text)}</p>')
            slot = article.slot_at(i)
            if slot is None:
                continue
            chosen = article.chosen_image(i)
            img = ""
            if chosen is not None:
                uri = self.thumb(chosen.path)
                img = f'<img src="{uri}" alt="{e(slot.caption)}">' if uri else \
                    f'<div class="xc-missing">image missing: {e(Path(chosen.path).name)}</div>'
            else:
                img = '<div class="xc-missing">no image chosen</div>'
            parts.append(f'<figure class="xc-figure" data-paragraph="{i}">{img}'
                         f'<figcaption>{e(slot.caption)}</figcaption></figure>')
        if article.fallbacks:
            notes = "".join(f"<li>{e(f)}</li>" for f in article.fallbacks)
            parts.append(f'<details class="xc-notes"><summary>Notes ({len(article.fallbacks)})</summary>'
                         f'<ul>{notes}</ul></details>')
        parts.append("</div>")
        return "".join(parts)

    def save(self, state: ComposeSession, session_hash: str | None) -> ComposeSession:
        """Save the session's article (atomically, into its own folder) and its zip; the download
        is a copy in a private temporary folder."""
        article = state.article
        folder = state.folder or article_dir(self.out_root, session_hash, article.title, article.id)
        zip_file = article.save_zip(folder)
        private = Path(tempfile.mkdtemp(dir=self.download_root))
        download = private / zip_file.name
        shutil.copy2(zip_file, download)
        return ComposeSession(article=article, folder=folder, zip_path=str(download))

    def candidates_view(self, article: Article | None, paragraph: int | None) -> list[tuple[str, str]]:
        if article is None or paragraph is None or article.slot_at(paragraph) is None:
            return []
        slot = article.slot_at(paragraph)
        marks = "ABCDEFGH"
        return [(c.path, f"{marks[k] if k < len(marks) else k + 1}{' (chosen)' if k == slot.chosen else ''}: "
                 f"{Path(c.path).name}") for k, c in enumerate(slot.candidates)]


def _upload_path(f: Any) -> str:
    if isinstance(f, dict):
        f = f.get("path") or f.get("name")
    elif hasattr(f, "path"):
        f = f.path
    if not isinstance(f, str) or not f:
        raise UserError("an upload arrived without a file; upload it again")
    return f


def _paragraph(value: Any, article: Article | None, what: str) -> int:
    if article is None:
        raise UserError("write an article first")
    try:
        i = int(value)
    except (TypeError, ValueError):
        raise UserError(f"choose {what} first") from None
    if not 0 <= i < len(article.paragraphs):
        raise UserError(f"paragraph {i} does not exist; the article has {len(article.paragraphs)}")
    return i


def describe_error(e: BaseException) -> str:
    """The message a page shows for a failed request."""
    from .checkpoint import CheckpointError
    from .library import LibraryError

    if isinstance(e, (UserError, ImageError, LibraryError, CheckpointError, FileNotFoundError, FileExistsError,
                      ValueError)):
        return str(e)
    log.error("request failed:\n%s", "".join(traceback.format_exception(e)))
    return f"internal error ({type(e).__name__}: {e}); the request was not completed, try again"


# -- the gradio app ------------------------------------------------------------------------------

CSS = """
#demo-banner {background:#fff4d6;border:1px solid #e0b84a;border-radius:6px;padding:.4rem .8rem}
.xc-article {font-size:1.02rem;line-height:1.7}
.xc-article .xc-pn {color:#999;font-size:.75rem;margin-right:.3rem}
.xc-figure {margin:1rem 0;text-align:center}
.xc-figure img {max-width:100%;max-height:360px;border-radius:4px}
.xc-figure figcaption {color:#666;font-size:.9rem}
.xc-missing {color:#a33;font-style:italic}
.xc-error {color:#b00020}
"""


def _error_md(message: str) -> str:
    return f'<span class="xc-error">Error: {html.escape(message)}</span>' if message else ""


def build_app(app: DemoApp):
    """The gradio Blocks for `app`; call `.queue(...)` / `.launch(...)` via `launch`."""
    cd, hd = app.compose_defaults, app.chat_defaults
    model_job = dict(concurrency_limit=app.max_concurrency, concurrency_id="model")

    with gr.Blocks(title="InternLM-XComposer", analytics_enabled=False) as demo:
        if app.banner:
            gr.Markdown(app.banner, elem_id="demo-banner")
        gr.Markdown("# InternLM-XComposer\nWrite illustrated articles from a title, or chat about images.")
        compose_state = gr.State(ComposeSession())
        chat_state = gr.State(ChatSession())

        with gr.Tabs():
            with gr.Tab("Compose", id="compose-tab", elem_id="compose-tab"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        title = gr.Textbox(label="Title", placeholder="e.g. 春天的西湖 / A weekend in Kyoto",
                                           elem_id="title", max_lines=2)
                        with gr.Row():
                            num_images = gr.Slider(0, 10, value=cd["num_images"], step=1, label="Number of images",
                                                   elem_id="num-images")
                            model_decides = gr.Checkbox(False, label="Let the model decide how many",
                                                        elem_id="model-decides")
                        text_len = gr.Slider(20, 2000, value=cd["max_new_tokens"], step=10,
                                             label="Text length (new tokens)", elem_id="text-length")
                        beams = gr.Slider(1, 5, value=cd["num_beams"], step=1, label="Beams", elem_id="beams")
                        penalty = gr.Slider(1.0, 10.0, value=cd["repetition_penalty"], step=0.1,
                                            label="Repetition penalty", elem_id="penalty")
                        sample = gr.Checkbox(cd["do_sample"], label="Sampling", elem_id="sample")
                        lang = gr.Radio([("中文 prompts", "zh"), ("English prompts", "en")], value="zh",
                                        label="Prompt language", elem_id="lang")
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

            with gr.Tab("Chat", id="chat-tab", elem_id="chat-tab"):
                chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot")
                chat_error = gr.Markdown("", elem_id="chat-error")
                chat_in = gr.MultimodalTextbox(file_types=["image"], file_count="multiple",
                                               placeholder="Upload images and ask a question",
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

        # ---- composition handlers ----
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

        def run_compose(title_text, n_images, decides, length, n_beams, pen, do_sample, language, state,
                        request: gr.Request):
            try:
                title_text = (title_text or "").strip()
                if not title_text:
                    raise UserError("type a title first")
                if len(title_text) > MAX_TITLE_CHARS:
                    raise UserError(f"the title is {len(title_text)} characters; keep it under {MAX_TITLE_CHARS}")
                gen = dict(max_new_tokens=int(length), num_beams=int(n_beams), repetition_penalty=float(pen),
                           do_sample=bool(do_sample))
                composer = app.composer(language or "zh")
                count = None if decides else int(n_images)

                def make():
                    written = ""
                    for ev in composer.run(title_text, num_images=count, **gen):
                        if ev.kind == "text":
                            written += ev.text
                            yield "text", app.render(None, streaming=written, title=title_text), None
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

        compose_btn.click(run_compose, [title, num_images, model_decides, text_len, beams, penalty, sample, lang,
                                        compose_state], compose_outputs, **model_job)
        title.submit(run_compose, [title, num_images, model_decides, text_len, beams, penalty, sample, lang,
                                   compose_state], compose_outputs, **model_job)

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
            state.article.choose(p, int(evt.index), by="user")
            return f"paragraph {p}: candidate {int(evt.index) + 1} chosen", p

        def on_select(state: ComposeSession, paragraph, evt: gr.SelectData, request: gr.Request):
            return apply_edit(choose, False, state, (paragraph, evt), request.session_hash)

        gallery.select(on_select, [compose_state, slot_pick], compose_outputs)

        def search_again(state: ComposeSession, paragraph, text):
            p = _paragraph(paragraph, state.article, "an image")
            text = (text or "").strip()
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

        # ---- chat handlers ----
        def ask(message, state: ChatSession, max_new, n_beams, pen, do_sample, temp, top_p, request: gr.Request):
            opts = (max_new, n_beams, pen, do_sample, temp, top_p)
            message = message or {}
            text = (message.get("text") or "").strip()
            files = message.get("files") or []
            try:
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
                    yield messages, new, {"text": "", "files": []}, ""
            except Exception as e:
                yield state.messages, state, gr.update(value=message), _error_md(describe_error(e))

        chat_in.submit(ask, [chat_in, chat_state, *chat_opts], [chatbot, chat_state, chat_in, chat_error],
                       **model_job)

        def regenerate(state: ChatSession, max_new, n_beams, pen, do_sample, temp, top_p):
            opts = (max_new, n_beams, pen, do_sample, temp, top_p)
            if state.last is None or len(state.history) < 2:
                yield state.messages, state, _error_md("nothing to regenerate yet: ask a question first")
                return
            text, refs, shown = state.last
            previous = ChatSession(history=state.history[:-2], messages=state.messages[:-2], last=None)
            try:
                options = app.chat_options(*opts)
                for messages, new in app.chat_turn(text, refs, shown, previous, options):
                    yield messages, new, ""
            except Exception as e:
                yield state.messages, state, _error_md(describe_error(e))

        regen.click(regenerate, [chat_state, *chat_opts], [chatbot, chat_state, chat_error], **model_job)
        clear.click(lambda: ([], ChatSession(), "", {"text": "", "files": []}), None,
                    [chatbot, chat_state, chat_error, chat_in])
        chatbot.clear(lambda: (ChatSession(), ""), None, [chat_state, chat_error])  # the chatbot's own bin icon
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
