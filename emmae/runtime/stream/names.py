"""Names a stream can write safely: in the journal, a STAR file, a log line or a tab-separated list."""

from __future__ import annotations

from emmae.runtime.outputs import printable
from emmae.runtime.stream.journal import journal_key

UNSAFE_CHARACTERS = frozenset("#'\"")  # break a STAR value (a comment, a quote)
STAR_RESERVED = ("data_", "loop_", "save_", "global_", "stop_")  # a STAR value cannot start with these


def unsafe_name(relative: str, name: str) -> str:
    """Why a file's name cannot be written safely (to the journal, a STAR file, a log line), or ''."""
    for text in (relative, name):
        if text.isprintable() and not any(c in text for c in UNSAFE_CHARACTERS):
            continue  # the common case, without a look at each character
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "its name is not valid UTF-8; rename the file"
        bad = sorted({c for c in text if not c.isprintable() or c in UNSAFE_CHARACTERS})
        if bad:
            listed = ", ".join(repr(c) for c in bad)
            return f"its name holds characters a STAR file cannot carry ({listed}); rename the file"
    if name.lower().startswith(STAR_RESERVED):
        return f"its name starts with a STAR keyword ({name.split('_')[0]}_); rename the file or set output.add_prefix"
    return ""


def shown(text: str) -> str:
    """``text`` for a log line or a tab-separated file: control characters and undecodable bytes escaped."""
    return printable(journal_key(text))
