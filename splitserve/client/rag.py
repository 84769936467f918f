"""RAG prompt helpers: shared documents first, the question last.

A server with prefix caching (and a KV-aware router) reuses work only for the
*leading* tokens requests have in common. So every prompt built here starts
with the same instructions and documents, byte for byte, and ends with its own
question: for a batch of questions over one document set the whole document
block is a shared prefix, computed once. Keep the document order fixed (do not
re-sort per question), or the prefixes stop matching.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_INSTRUCTIONS = "Answer the question using only the documents below. Be brief."


@dataclass(frozen=True, slots=True)
class Document:
    name: str
    text: str


def load_documents(directory: str | os.PathLike, pattern: str = "*.txt") -> list[Document]:
    """The files matching ``pattern`` in ``directory``, sorted by name (a stable order: stable prefixes)."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"document directory {str(root)!r} does not exist")
    docs = [Document(p.stem, p.read_text(encoding="utf-8").strip()) for p in sorted(root.glob(pattern)) if p.is_file()]
    if not docs:
        raise ValueError(f"no files matching {pattern!r} in {str(root)!r}")
    return docs


def _as_documents(documents: Sequence[Document | str]) -> list[Document]:
    return [d if isinstance(d, Document) else Document(f"doc{i + 1}", d) for i, d in enumerate(documents)]


def format_documents(documents: Sequence[Document | str]) -> str:
    """The documents as one block: ``[1] name\\ntext`` each, separated by blank lines."""
    docs = _as_documents(documents)
    return "\n\n".join(f"[{i + 1}] {d.name}\n{d.text}" for i, d in enumerate(docs))


def rag_prefix(documents: Sequence[Document | str], instructions: str = DEFAULT_INSTRUCTIONS) -> str:
    """The part every prompt over these documents shares: instructions, then the documents."""
    return f"{instructions}\n\nDocuments:\n\n{format_documents(documents)}\n\n"


def rag_prompt(documents: Sequence[Document | str], question: str, instructions: str = DEFAULT_INSTRUCTIONS) -> str:
    """A completion prompt: ``rag_prefix(documents)``, then the question and ``Answer:``."""
    return f"{rag_prefix(documents, instructions)}Question: {question.strip()}\nAnswer:"


def rag_messages(documents: Sequence[Document | str], question: str,
                 instructions: str = DEFAULT_INSTRUCTIONS) -> list[dict[str, str]]:
    """Chat messages: a system message with the instructions and documents, then the question as the user."""
    return [
        {"role": "system", "content": rag_prefix(documents, instructions).rstrip()},
        {"role": "user", "content": question.strip()},
    ]


def common_prefix(texts: Sequence[str]) -> str:
    """The longest prefix all ``texts`` share (to check how much of a batch a cache can reuse)."""
    return os.path.commonprefix(list(texts)) if texts else ""
