"""The web demo for a text-only InternLM (either family): a chat tab and a documents tab.

The composition and image-chat tabs need an InternLM-XComposer; when `--folder` is a text-only
model the page offers plain chat and chat over documents instead (`text_tabs`). The documents tab
follows InternLM's file-chat demo for the 1M model (`long_context/doc_chat_demo.py` of the InternLM
repository): PDF, TXT and Markdown; the documents' text goes in front of the first question
(`{documents}\\n\\n{question}`), later questions continue the conversation; recommended settings for
long inputs temperature 0.05 and repetition penalty 1.02 (its README). PDFs are read with `pypdf`
(upstream converts them with its Magic-Doc tool; we extract the text layer). Each document shows
its token count against the context window, and a conversation that would not fit is refused with
both numbers before any generation.
"""
from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .app import DemoApp, UserError, _upload_path

# InternLM's chat defaults (modeling_internlm*.py chat()): sampling at 0.8 / top-p 0.8, 1024 new tokens
TEXT_CHAT_DEFAULTS = dict(max_new_tokens=1024, num_beams=1, repetition_penalty=1.0, do_sample=True, temperature=0.8,
                          top_p=0.8)
# upstream's file-chat settings for long inputs (long_context/README.md, doc_chat_demo.py: top-p 1.0)
DOC_DEFAULTS = dict(max_new_tokens=1024, num_beams=1, repetition_penalty=1.02, do_sample=True, temperature=0.05,
                    top_p=1.0)
DOC_SUFFIXES = {".pdf": "PDF", ".txt": "text", ".md": "Markdown", ".markdown": "Markdown"}
MAX_DOCUMENTS = 8
TEXT_BANNER = ("**Demo mode.** This page runs a tiny, randomly initialised InternLM2 built on the fly: its "
               "answers are noise. Start `web_demo.py --folder` with a real InternLM2.5 (or InternLM) chat "
               "model for real output.")


@dataclass(frozen=True)
class Document:
    name: str
    kind: str
    text: str
    tokens: int


def read_document(path: str | Path, name: str | None = None) -> tuple[str, str]:
    """(kind, text) of an uploaded PDF, TXT or Markdown file; a `UserError` naming the file and the
    problem otherwise (unknown type, unreadable or encrypted PDF, no text layer, not UTF-8)."""
    path = Path(path)
    name = name or path.name
    kind = DOC_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{name}: only PDF, TXT and Markdown (.md) files can be read; convert it to one of those")
    if kind == "PDF":
        text = _pdf_text(path, name)
    else:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise UserError(f"{name} is not UTF-8 text (byte {e.start} is invalid); save it as UTF-8 and "
                            f"upload it again") from None
    text = text.replace("\r\n", "\n").strip()
    if not text:
        raise UserError(f"{name} holds no text" + (" (a scanned PDF has images only: run OCR first)"
                                                  if kind == "PDF" else ""))
    return kind, text


def _pdf_text(path: Path, name: str) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            raise UserError(f"{name} is an encrypted PDF: remove the password and upload it again")
        pages = [page.extract_text() or "" for page in reader.pages]
    except UserError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as e:
        raise UserError(f"{name} cannot be read as a PDF ({type(e).__name__}: {e}); the file is damaged or "
                        f"not a PDF") from None
    return "\n\n".join(p.strip() for p in pages if p.strip())


@dataclass
class TextChatSession:
    history: list[tuple[str, str]] = field(default_factory=list)  # the model's (query, response) pairs
    messages: list[dict[str, Any]] = field(default_factory=list)  # what the chatbot shows
    last: str | None = None


@dataclass
class DocSession:
    documents: list[Document] = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)  # the first query holds the documents
    messages: list[dict[str, Any]] = field(default_factory=list)


class TextDemoApp(DemoApp):
    """`DemoApp` for an `xcomposer.InternLM` (no library, no composition)."""

    text_only = True

    def __init__(self, model, out_root="web_demo_output", *, banner: str | None = None, max_concurrency: int = 1,
                 chat_defaults: dict | None = None, doc_defaults: dict | None = None):
        super().__init__(model, None, out_root, banner=banner, max_concurrency=max_concurrency,
                         chat_defaults={**TEXT_CHAT_DEFAULTS, **(chat_defaults or {})})
        self.doc_defaults = {**DOC_DEFAULTS, **(doc_defaults or {})}
        if getattr(model, "tokenizer", None) is None:
            raise UserError("the model folder has no tokenizer.model: a text chat needs the checkpoint's tokenizer")

    @property
    def window(self) -> int:
        return self.model.context_window

    @property
    def family(self) -> str:
        return "InternLM2" if self.model.config.family == "internlm2" else "InternLM"

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text, add_bos=False))

    # -- streaming a turn ----------------------------------------------------------------------
    def _turn(self, query: str, shown: str, history, messages, options) -> Iterator[tuple[list, list, str]]:
        """Yields (messages to show, history, reply so far); the last yield carries the new history."""
        tok = self.model.tokenizer
        messages = messages + [{"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
        yield messages, history, ""
        reply, new_history = "", history
        for reply, new_history in self.stream_locked(
                lambda: self.model.stream_chat(tok, query, history=history, **options)):
            messages[-1] = {"role": "assistant", "content": reply}
            yield messages, history, reply
        if not reply.strip():
            messages[-1] = {"role": "assistant", "content": "(the model gave an empty reply)"}
        yield messages, new_history, reply

    def text_chat_turn(self, text: str, state: TextChatSession, options: dict) -> Iterator[tuple[list, TextChatSession]]:
        for messages, history, _ in self._turn(text, text, state.history, state.messages, options):
            yield messages, (state if history is state.history else
                             TextChatSession(history=history, messages=messages, last=text))

    # -- documents -------------------------------------------------------------------------------
    def add_documents(self, files: list[Any], state: DocSession) -> DocSession:
        paths = [_upload_path(f) for f in files or []]
        if len(state.documents) + len(paths) > MAX_DOCUMENTS:
            raise UserError(f"at most {MAX_DOCUMENTS} documents per conversation; clear it to start another")
        if state.history:
            raise UserError("the documents are already part of this conversation: clear it to ask about others")
        docs = list(state.documents)
        for p in paths:
            name = Path(p).name
            kind, text = read_document(p, name)
            docs.append(Document(name=name, kind=kind, text=text, tokens=self.count_tokens(text)))
        return dataclasses.replace(state, documents=docs)

    def documents_table(self, state: DocSession) -> str:
        if not state.documents:
            return f"No documents yet. Upload PDF, TXT or Markdown files (context window: {self.window} tokens)."
        rows = ["| document | type | tokens | of the context window |", "|---|---|---:|---:|"]
        for d in state.documents:
            rows.append(f"| {_md_cell(d.name)} | {d.kind} | {d.tokens} | {100 * d.tokens / self.window:.1f}% |")
        total = sum(d.tokens for d in state.documents)
        rows.append(f"| **all** | | **{total}** | **{100 * total / self.window:.1f}%** of {self.window} |")
        note = "" if total < self.window else (
            f"\n\n**These documents do not fit**: {total} tokens, the context window is {self.window}. "
            f"Remove some (Clear) or load the model with a larger `max_context`.")
        return "\n".join(rows) + note

    def doc_turn(self, question: str, state: DocSession, options: dict) -> Iterator[tuple[list, DocSession]]:
        if not state.documents:
            raise UserError("upload a document first (PDF, TXT or Markdown)")
        first = not state.history
        query = "\n\n".join(d.text for d in state.documents) + "\n\n" + question if first else question
        used = self.count_tokens(query) + sum(self.count_tokens(q) + self.count_tokens(r) for q, r in state.history)
        room = options["max_new_tokens"]
        if used + 16 * (len(state.history) + 2) >= self.window:  # 16: generous room for the chat template
            raise UserError(f"the documents and this conversation take {used} tokens but the context window is "
                            f"{self.window}: they do not fit. Clear and upload less, or load the model with a larger "
                            f"max_context")
        options = {**options, "max_new_tokens": max(1, min(room, self.window - used - 16 * (len(state.history) + 2)))}
        for messages, history, _ in self._turn(query, question, state.history, state.messages, options):
            yield messages, (state if history is state.history else
                             DocSession(documents=state.documents, history=history, messages=messages))


def _md_cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|").replace("\n", " ")


__all__ = ["TextDemoApp", "TextChatSession", "DocSession", "Document", "read_document", "TEXT_CHAT_DEFAULTS",
           "DOC_DEFAULTS", "TEXT_BANNER"]
