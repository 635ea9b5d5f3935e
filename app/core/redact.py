"""Server paths out of what callers see: error messages, job errors and the tracebacks kept in job events.

Known roots become placeholders (`<data>/store/...`, `<tmp>/...`, `<site-packages>/torch/...`, project files
relative to the checkout); any other absolute path keeps only its last component (`<path>/model.onnx`).
"""

from __future__ import annotations

import re
import site
import sys
import sysconfig
import tempfile
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.core.settings import get_settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# an absolute path that starts a token (not the middle of a URL or of a/b); stops at whitespace and quotes
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/<>~-])/(?:[^\s'\"/,;:()\[\]{}<>]+/)*([^\s'\"/,;:()\[\]{}<>]+)")


@lru_cache
def _library_roots() -> tuple[str, ...]:
    candidates = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib", "platstdlib")}
    candidates.update(getattr(site, "getsitepackages", list)())
    return tuple(sorted({str(Path(p).resolve()) for p in candidates if p}, key=len, reverse=True))


def _roots() -> list[tuple[str, str]]:
    """(absolute prefix, placeholder), longest first so the most specific root wins."""
    data_dir = get_settings().data_dir.resolve()
    pairs = [(str(data_dir), "<data>"), (str(PROJECT_ROOT), "")]
    for tmp in {tempfile.gettempdir(), str(Path(tempfile.gettempdir()).resolve())}:
        pairs.append((tmp, "<tmp>"))
    pairs += [(root, "<site-packages>" if "-packages" in root else "<python>") for root in _library_roots()]
    pairs += [(sys.prefix, "<python>"), (str(Path.home()), "~")]
    return sorted({p for p in pairs if len(p[0]) > 1}, key=lambda p: len(p[0]), reverse=True)


def redact_paths(text: str) -> str:
    for prefix, placeholder in _roots():
        # whole path components only: /app must not eat /apple, nor /tmp the middle of /var/tmp
        pattern = r"(?<![\w.~/-])" + re.escape(prefix) + r"(/|(?![\w.-]))"
        text = re.sub(pattern, lambda m, p=placeholder: _placed(p, m.group(1)), text)
    return _ABSOLUTE_PATH.sub(lambda m: f"<path>/{m.group(1)}", text)


def _placed(placeholder: str, slash: str) -> str:
    if placeholder:
        return placeholder + slash
    return "" if slash else "."  # the checkout: its files by relative path


def redact_value(value: Any) -> Any:
    """redact_paths over every string inside a JSON-like value (error details, pre-flight results)."""
    if isinstance(value, str):
        return redact_paths(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def short_traceback(exc: BaseException, limit: int = 500) -> str:
    """The root cause and its innermost frames, paths redacted, at most `limit` characters."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    head = redact_paths(f"{type(root).__name__}: {root}")[: limit // 2]
    frames = [f"{redact_paths(f.filename)}:{f.lineno} in {f.name}" for f in traceback.extract_tb(root.__traceback__)]
    kept: list[str] = []
    budget = limit - len(head) - len(" | at ")
    for frame in reversed(frames):  # innermost first: the frame that raised matters most
        if sum(len(k) + 3 for k in kept) + len(frame) > budget:
            break
        kept.append(frame)
    return f"{head} | at {' < '.join(kept)}"[:limit] if kept else head
