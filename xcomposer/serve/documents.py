"""Documents a user chats about: PDF (text layer through `pypdf`), TXT and Markdown, read into text
with clear refusals, and the prompt layout of InternLM's long-context file chat.

Facts (InternLM/InternLM `long_context/doc_chat_demo.py` and `long_context/README.md`): the
document's text goes in front of the first question after it was uploaded, as
`f"{document}\\n\\n{question}"`; later turns are plain questions. The README recommends temperature
0.05 and repetition penalty 1.02 for long inputs (its page also defaults to top_p 1.0 and 1024 new
tokens). Upstream converts PDFs to Markdown with its own Magic-Doc tool; we take the PDF's text
layer with pypdf, page by page, and say so when a PDF has none (a scan needs OCR first).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from ..llm.tokenizer import check_text

SUFFIXES = {".pdf": "pdf", ".txt": "text", ".md": "markdown", ".markdown": "markdown"}
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
MAX_PDF_PAGES = 5000
# InternLM's recommended settings for long inputs (long_context/README.md, doc_chat_demo.py)
LONG_INPUT_DEFAULTS = dict(max_new_tokens=1024, do_sample=True, temperature=0.05, top_p=1.0,
                           repetition_penalty=1.02)


class DocumentError(ValueError):
    """A document that cannot be read; the message names the file and what to do."""


@dataclass(frozen=True)
class Document:
    name: str   # the file name as uploaded (no folders)
    kind: str   # "pdf", "text" or "markdown"
    text: str
    pages: int | None = None  # PDFs only


def read_document(path: str | os.PathLike, name: str | None = None) -> Document:
    """Read a PDF, TXT or Markdown file into text. `name` is what the user called it (an upload's
    original name; the temporary path's name otherwise)."""
    path = Path(path)
    name = Path(name).name if name else path.name
    kind = SUFFIXES.get(Path(name).suffix.lower()) or SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DocumentError(f"{name}: not a PDF, TXT or Markdown file (.pdf, .txt, .md); save it as one of those")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DocumentError(f"{name}: cannot be read ({e.strerror}); upload it again") from None
    if size == 0:
        raise DocumentError(f"{name}: the file is empty; upload it again")
    if size > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"{name}: {size / 2**20:.0f} MiB is more than the {MAX_DOCUMENT_BYTES // 2**20} MiB a "
                            f"document may have; split it")
    data = path.read_bytes()
    if kind == "pdf":
        text, pages = _pdf_text(data, name)
    else:
        text, pages = _plain_text(data, name), None
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        why = "has no text layer (a scan?): run OCR on it first" if kind == "pdf" else "holds only blank space"
        raise DocumentError(f"{name}: the document {why}")
    return Document(name=name, kind=kind, text=text, pages=pages)


def _plain_text(data: bytes, name: str) -> str:
    if b"\x00" in data[:4096] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DocumentError(f"{name}: this is a binary file, not text; upload a .txt or .md file")
    for bom, codec in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError:
                break
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{name}: not valid UTF-8 (byte {e.start}); save the file as UTF-8 and upload it "
                            f"again") from None


def _pdf_text(data: bytes, name: str) -> tuple[str, int]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    if not data.lstrip()[:5].startswith(b"%PDF"):
        raise DocumentError(f"{name}: not a PDF file (no %PDF header); upload the PDF itself")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError(f"{name}: the PDF is encrypted; save an unprotected copy and upload that")
        n = len(reader.pages)
        if n > MAX_PDF_PAGES:
            raise DocumentError(f"{name}: {n} pages is more than {MAX_PDF_PAGES}; split the PDF")
        parts = [(page.extract_text() or "").strip() for page in reader.pages]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError,
            RecursionError) as e:
        raise DocumentError(f"{name}: the PDF is damaged and cannot be read ({type(e).__name__}); export it "
                            f"again or upload its text") from None
    return "\n\n".join(p for p in parts if p), n


def with_documents(question: str, documents: list[Document]) -> str:
    """The first question about `documents`, laid out as InternLM's file chat does."""
    check_text(question, "the question")
    if not documents:
        return question
    return "\n\n".join(d.text for d in documents) + "\n\n" + question


__all__ = ["Document", "DocumentError", "LONG_INPUT_DEFAULTS", "MAX_DOCUMENT_BYTES", "read_document",
           "with_documents"]
