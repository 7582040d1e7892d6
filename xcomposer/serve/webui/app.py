"""The web demo's shared parts: `DemoApp` (the model, the library, the output root and the model lock),
per-session state, paths, error messages. The tabs (`compose_tab`, `chat_tab`) lay out their controls
and handlers on top of it; `blocks` assembles the page and serves it. Design points:

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

from vision.image import ImageError, load_image, to_data_uri

from ...compose.article import Article, safe_folder_name
from ...models.xcomposer2d5 import VIDEO_EXTENSIONS

log = logging.getLogger("xcomposer.serve.webui")

# upstream web_demo defaults (InternLM-XComposer-1.0/examples/web_demo.py): composition with 5 beams,
# repetition penalty 5.0, text length 1000 and 5 images; chat with 512 new tokens, 3 beams,
# repetition penalty 1.0 and sampling on
COMPOSE_DEFAULTS = dict(max_new_tokens=1000, num_beams=5, repetition_penalty=5.0, do_sample=False, num_images=5)
CHAT_DEFAULTS = dict(max_new_tokens=512, num_beams=3, repetition_penalty=1.0, do_sample=True, temperature=1.0,
                     top_p=1.0)
# a text-only InternLM and XComposer2 / 2.5: the chat() defaults their chat format owns, one beam
# (`_own_chat_defaults`)
CHAT_OPTION_NAMES = ("max_new_tokens", "repetition_penalty", "do_sample", "temperature", "top_p")
# XComposer2 (InternLM-XComposer-2.0/examples/gradio_demo_composition.py): 6 images, sampling with
# repetition penalty 1.005, up to 4096 tokens, one beam, seed 8909, no meta instruction
XCOMPOSER2_COMPOSE_DEFAULTS = dict(max_new_tokens=4096, num_beams=1, repetition_penalty=1.005, do_sample=True,
                                   num_images=6, seed=8909, with_meta=False)
# XComposer2.5 (gradio_demo/gradio_demo_composition.py at the repository root): 1 image, sampling with
# repetition penalty 1.005, up to 8192 tokens, one beam, seed 1234, no meta instruction
XCOMPOSER2D5_COMPOSE_DEFAULTS = dict(XCOMPOSER2_COMPOSE_DEFAULTS, max_new_tokens=8192, num_images=1, seed=1234)
# XComposer2.5's web-page functions (write_webpage, resume_2_webpage, screen_2_webpage)
WEBPAGE_DEFAULTS = dict(max_new_tokens=4800, num_beams=2, repetition_penalty=3.0, do_sample=True, seed=None)
MAX_WEBPAGE_CHARS = 20000  # an instruction, or a resume in markdown
MAX_TITLE_CHARS = 500
MAX_INSTRUCTION_CHARS = 8000  # XComposer2: an instruction may carry its material
MAX_REFERENCES = 10           # upstream's cap on reference images
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
    images: list[str] = field(default_factory=list)  # XComposer2: earlier turns' images, passed again each turn
    dropped: int = 0  # oldest exchanges the last reply's prompt left out (to fit the window or session)


@dataclass
class ComposeSession:
    article: Article | None = None
    folder: Path | None = None
    zip_path: str | None = None


class DemoApp:
    """The model, the library and the output root, shared by all sessions; handlers take the
    session's state and return its new value."""

    def __init__(self, model, library=None, out_root: str | Path = "web_demo_output", *, banner: str | None = None,
                 max_concurrency: int = 1, compose_defaults: dict | None = None, chat_defaults: dict | None = None,
                 max_batch_size: int = 1):
        self.model = model
        # an XComposer sees images and writes articles; a text-only InternLM chats and reads documents
        self.vision = hasattr(model, "encode_image")
        # XComposer2 chats about images (upstream's (query, response) history) and composes with its own prompts
        from ...models.xcomposer2 import XComposer2
        from ...models.xcomposer2d5 import XComposer2d5
        self.xcomposer2 = isinstance(model, XComposer2)
        self.xcomposer2d5 = isinstance(model, XComposer2d5)  # also writes web pages
        self.out_root = Path(out_root).resolve()
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.banner = banner
        self.max_concurrency = max_concurrency
        self.library = library
        own_compose = (XCOMPOSER2D5_COMPOSE_DEFAULTS if self.xcomposer2d5 else XCOMPOSER2_COMPOSE_DEFAULTS
                       if self.xcomposer2 else COMPOSE_DEFAULTS)
        self.compose_defaults = {**own_compose, **(compose_defaults or {})}
        # the model's one chat format: prompts, defaults, stop tokens and history rules of every turn
        self.chat_format = model.chat_format
        own = CHAT_DEFAULTS if self.vision and not self.xcomposer2 else self._own_chat_defaults()
        self.chat_defaults = {**own, **(chat_defaults or {})}
        self.lock = threading.Lock()
        # one-beam chats of several sessions run together in the batching engine (serve/engine.py),
        # which holds the same lock for each step: beam search and composition run between steps
        self.engine = None
        if max_batch_size > 1:
            from ..engine import Engine
            from ..prompts import ServedModel
            self.served = ServedModel(model, "web-demo")
            self.engine = Engine(model, max_batch_size=max_batch_size, model_lock=self.lock)
        self.download_root = Path(tempfile.mkdtemp(prefix="xcomposer-downloads-"))
        self._thumbs: OrderedDict[tuple, str] = OrderedDict()

    def _own_chat_defaults(self) -> dict[str, Any]:
        """The model's chat() defaults from its chat format, with one beam (XComposer 1.0 keeps
        upstream's web demo settings instead: CHAT_DEFAULTS)."""
        cfg = self.chat_format.generation_config({})
        return {**{k: getattr(cfg, k) for k in CHAT_OPTION_NAMES}, "num_beams": 1}

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

    def store_uploads(self, files: list[Any], session_hash: str | None,
                      limit: int = MAX_UPLOADS) -> tuple[list[str], list[str]]:
        """Validate uploaded files and keep a PNG copy of each in the session folder; returns
        (paths for the model, paths to show). Any bad file refuses the whole message."""
        paths = [_upload_path(f) for f in files or []]
        if paths and not self.vision:
            raise UserError("this model reads text only: send the question without images (an InternLM-XComposer "
                            "checkpoint answers about images)")
        if len(paths) > limit:
            raise UserError(f"{len(paths)} images in one message; send at most {limit}")
        folder = session_dir(self.out_root, session_hash) / "uploads"
        pictures = []
        for i, p in enumerate(paths):
            which = f"file {i + 1} of {len(paths)}" if len(paths) > 1 else "the file"
            if self.xcomposer2d5 and str(p).lower().endswith(VIDEO_EXTENSIONS):  # 2.5 reads videos
                from vision.hd import VideoError, load_video
                try:
                    load_video(p, max_frames=1)  # the container and its first frame decode
                except (VideoError, ValueError) as e:
                    raise UserError(f"{which} ({Path(p).name}) cannot be used as a video: {e}") from e
                pictures.append(Path(p))
                continue
            try:
                pictures.append(load_image(p))
            except ImageError as e:
                which = f"image {i + 1} of {len(paths)}" if len(paths) > 1 else "the image"
                raise UserError(f"{which} ({Path(p).name}) cannot be used: {e.reason}") from e
        folder.mkdir(parents=True, exist_ok=True)
        stored = []
        for picture in pictures:
            if isinstance(picture, Path):  # a video: kept as sent, under a name of our own
                dest = folder / f"{uuid.uuid4().hex}{picture.suffix.lower()}"
                shutil.copyfile(picture, dest)
            else:
                dest = folder / f"{uuid.uuid4().hex}.png"
                picture.save(dest)
            stored.append(str(dest))
        return stored, paths

    def chat_turn(self, text: str, refs: list[str], shown: list[str], state: ChatSession,
                  options: dict, model_text: str | None = None,
                  keep_first: bool = False) -> Iterator[tuple[list[dict], ChatSession]]:
        """Stream one turn: yields (messages to show, state); the state changes only when the
        reply is complete (its `dropped` says how many of the oldest exchanges the model did not
        read). `model_text`, if given, is what the model reads instead of `text` (a question with its
        documents in front); `keep_first` keeps the first exchange (the documents) when older ones
        must be left out."""
        user_content: list[Any] = [{"path": p} for p in shown]
        if text:
            user_content.append(text)
        messages = state.messages + [{"role": "user", "content": user_content},
                                     {"role": "assistant", "content": ""}]
        yield messages, state
        history = state.history

        query = text if model_text is None else model_text
        images = list(state.images)
        if self.xcomposer2:  # each image where it was sent (at the question's start), all images passed again
            # (2.5 places them by its own rules: a lone image before the prompt, several labelled Image1 ...)
            if refs and "<ImageHere>" not in query and not self.xcomposer2d5:
                query = "<ImageHere>" * len(refs) + query
            images += refs

        turn_images = images if self.xcomposer2 else refs

        def make():  # beam search (or no engine): the model generates here, from the same chat format
            return self.chat_format.stream_turn(query, turn_images, history, options, keep_first=keep_first)

        reply, new_history, dropped = "", None, 0
        batched = self.engine is not None and int(options.get("num_beams", 1)) == 1
        source = (self._engine_pieces(query, turn_images, history, options, keep_first) if batched
                  else self.stream_locked(make))
        for kind, value in source:
            if kind == "piece":
                reply += value
                messages[-1] = {"role": "assistant", "content": reply}
                yield messages, state
            elif kind == "dropped":
                dropped = value
            else:
                new_history = value
        if not reply.strip():
            messages[-1] = {"role": "assistant", "content": "(the model gave an empty reply)"}
        new = ChatSession(history=new_history, messages=messages, last=(text, refs, shown),
                          images=images if self.xcomposer2 else [], dropped=dropped)
        yield messages, new

    def fit_document_chat(self, chat: ChatSession, question: str, max_new_tokens: int) -> tuple[ChatSession, int]:
        """A document conversation (text InternLM: the documents are in the first question) with the
        oldest question/answer pairs *after* the first left out until `question` and room for the reply
        fit (the context window, or the engine's session length; with only the documents left, a
        shorter reply is accepted, as generation shortens it), so the documents are never the turn
        that falls out (the chat format's `keep_first`; the model's own chat() would drop the oldest
        turn: the one holding them). Returns the session and how many pairs were left out; UserError
        when the documents and the question alone no longer fit."""
        from ...llm.generation import PromptTooLongError
        fmt = self.chat_format
        budget = self.engine.session_len if self.engine is not None else None
        cfg = fmt.generation_config({"max_new_tokens": max_new_tokens})
        try:
            kept, removed = fmt.fit(question, chat.history, cfg, budget=budget, keep_first=True)
        except PromptTooLongError as e:
            raise UserError(f"the documents, the first answer and this question no longer fit the model's "
                            f"{fmt.window(budget):,}-token window with {max_new_tokens} tokens for the reply: press "
                            f"Clear to start a new conversation, or ask for a shorter reply") from e
        if not removed:
            return chat, 0
        # the page keeps showing every turn; only what the model reads leaves them out
        return ChatSession(history=[list(t) for t in kept], messages=list(chat.messages), last=chat.last,
                           images=list(chat.images)), removed

    @property
    def history_entries_per_turn(self) -> int:
        """XComposer 1.0 keeps a user and a bot entry per turn; InternLM and XComposer2 keep
        upstream's one (query, response) pair (the chat format's history codec)."""
        return self.chat_format.history_entries_per_turn

    def regenerate_turn(self, state: ChatSession) -> tuple[str, list[str], list[str], ChatSession]:
        """The last question (text, model refs, shown files) and the session as it was before it,
        to ask it again; ValueError when there is nothing to regenerate."""
        per = self.history_entries_per_turn
        if state.last is None or len(state.history) < per or len(state.messages) < 2:
            raise ValueError("nothing to regenerate yet: ask a question first")
        text, refs, shown = state.last
        images = state.images[:len(state.images) - len(refs)] if self.xcomposer2 and refs else list(state.images)
        previous = ChatSession(history=state.history[:-per], messages=state.messages[:-2], last=None, images=images)
        return text, refs, shown, previous

    def _engine_pieces(self, query: str, refs: list[str], history: list, options: dict,
                       keep_first: bool = False) -> Iterator[tuple[str, Any]]:
        """One chat turn through the batching engine, as ("dropped", n), ("piece", text) ...,
        ("history", history); the prompt and options are the model's chat format's, fitted to the
        engine's session length."""
        from ..engine import QueueFullError

        cfg = self.served.config(options)
        # the prompt and the history after the reply come from the served model's one chat format
        prompt, new_history, dropped = self.served.turn_prompt(query, refs, history, cfg,
                                                               budget=self.engine.session_len, keep_first=keep_first)
        yield "dropped", dropped
        events: queue.Queue = queue.Queue()
        try:
            req = self.engine.submit(prompt, cfg, events.put)
        except QueueFullError as e:
            raise UserError(f"the server is busy ({e}); try again in a moment") from None
        try:
            reply = ""
            while True:
                ev = events.get()
                if ev.kind == "text":
                    reply += ev.text
                    yield "piece", ev.text
                elif ev.kind == "error":
                    raise (UserError(ev.text) if ev.error_type == "invalid_request" else RuntimeError(ev.text))
                else:
                    break
            yield "history", new_history(reply)
        finally:
            req.cancel()  # the page went away (or the reply is complete: then nothing happens)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # -- composition ---------------------------------------------------------------------------
    def composer(self, lang: str = "zh"):
        from ...compose.pipeline import Composer

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

    def web_page(self, kind: str, text: str, refs: list[str], options: dict[str, Any],
                 session_hash: str | None) -> tuple[str, str]:
        """XComposer2.5's web page of `kind` ("instruction", "resume" or "screenshot") -> (the HTML, a
        private copy to download). The page is saved atomically in the session's folder first."""
        from ...models.xcomposer2d5 import WEB_TASKS, save_html
        if not self.xcomposer2d5:
            raise UserError("web pages need an InternLM-XComposer2.5 checkpoint (internlm/internlm-xcomposer2d5-7b)")
        if kind not in WEB_TASKS:
            raise UserError(f"unknown page kind {kind!r}: choose instruction, resume or screenshot")
        text = (text or "").strip()
        if kind != "screenshot" and not text:
            raise UserError("type an instruction (or paste a resume in markdown) first")
        if len(text) > MAX_WEBPAGE_CHARS:
            raise UserError(f"the text is {len(text):,} characters; keep it under {MAX_WEBPAGE_CHARS:,}")
        if kind == "screenshot" and not refs:
            raise UserError("upload a screenshot of the page to rebuild")
        model = self.model
        run = {"instruction": lambda: model.write_webpage(text, refs or None, **options),
               "resume": lambda: model.resume_2_webpage(text, refs or None, **options),
               "screenshot": lambda: model.screen_2_webpage("", refs[:1], **options)}[kind]
        html = self.call_locked(run)
        folder = session_dir(self.out_root, session_hash) / "pages"
        saved = save_html(html, folder / f"{WEB_TASKS[kind].replace(' ', '_')}-{uuid.uuid4().hex[:8]}.html")
        private = Path(tempfile.mkdtemp(dir=self.download_root)) / saved.name
        shutil.copy2(saved, private)
        return html, str(private)

    def candidates_view(self, article: Article | None, paragraph: int | None) -> list[tuple[Any, str]]:
        """Gallery items of a slot's candidates: library images by path (the library is served), others
        (XComposer2's reference images, stored in the blocked output folder) as downscaled pictures."""
        if article is None or paragraph is None or article.slot_at(paragraph) is None:
            return []
        slot = article.slot_at(paragraph)
        marks = "ABCDEFGHIJ"
        root = self.library.root.resolve() if self.library is not None else None
        items = []
        for k, c in enumerate(slot.candidates):
            label = f"{marks[k] if k < len(marks) else k + 1}{' (chosen)' if k == slot.chosen else ''}: {Path(c.path).name}"
            items.append((c.path if root is not None and Path(c.path).resolve().is_relative_to(root)
                          else self._thumb_picture(c.path), label))
        return items

    def _thumb_picture(self, path: str):
        """A downscaled copy of a picture outside the library (a grey square if it cannot be read, so
        the gallery's positions still match the candidates)."""
        try:
            picture = load_image(path)
        except ImageError:
            from PIL import Image
            return Image.new("RGB", (64, 64), (200, 200, 200))
        picture.thumbnail((THUMB_SIDE, THUMB_SIDE))
        return picture


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
    from ...llm.checkpoint import CheckpointError
    from ...compose.library import LibraryError

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


def without_surrogates(value: Any) -> Any:
    """`value` (str, or dicts and lists of them) with lone surrogates replaced by U+FFFD: such text
    cannot be sent back to the page (it is not valid UTF-8), but the rest of what the user typed can."""
    if isinstance(value, str):
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if isinstance(value, dict):
        return {k: without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_surrogates(v) for v in value]
    return value


def _error_md(message: str) -> str:
    return f'<span class="xc-error">Error: {html.escape(message)}</span>' if message else ""
