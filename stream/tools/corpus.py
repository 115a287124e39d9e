"""Real English sample texts, offline: first paragraphs of the standard library's docstrings.

Used by the demo and the benchmark. Deterministic for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
import re

MODULES = (
    "asyncio",
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "csv",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "fractions",
    "functools",
    "gzip",
    "hashlib",
    "heapq",
    "html",
    "http.client",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "math",
    "mimetypes",
    "os",
    "pathlib",
    "pickle",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "shutil",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "wave",
    "webbrowser",
    "xml.dom.minidom",
    "zipfile",
    "zlib",
)


def sample_texts(
    limit: int | None = None, *, min_words: int = 6, max_words: int = 200
) -> list[str]:
    """Distinct docstring paragraphs, taken from the modules in turn, in a stable order."""
    per_module = [_module_texts(name, min_words, max_words) for name in MODULES]
    texts: dict[str, None] = {}
    for round_ in range(max(map(len, per_module), default=0)):
        for candidates in per_module:
            if round_ < len(candidates):
                texts.setdefault(candidates[round_])
                if limit is not None and len(texts) >= limit:
                    return list(texts)
    return list(texts)


def _module_texts(module_name: str, min_words: int, max_words: int) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    objects = [module] + [
        value
        for name, value in sorted(vars(module).items())
        if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
    ]
    texts: dict[str, None] = {}
    for obj in objects:
        for paragraph in _paragraphs(inspect.getdoc(obj) or ""):
            words = paragraph.split()
            if min_words <= len(words) <= max_words and _is_prose(paragraph):
                texts.setdefault(" ".join(words))
    return list(texts)


def _paragraphs(doc: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", doc) if p.strip()]


def _is_prose(paragraph: str) -> bool:
    """Sentences, not signatures, tables or code samples."""
    if any(marker in paragraph for marker in (">>>", "::", "->", "  ", "|", "{", "}")):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in paragraph)
    return letters / len(paragraph) > 0.85 and paragraph[0].isupper()
