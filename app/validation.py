"""What text pgsage takes from a client: one rule for the API's fields and the loaders' (a JSONL line's title and
metadata, a multipart upload's metadata field), so each refuses the same things with the same words.

A NUL, a lone surrogate, a control character (one-line fields: any; free text: any but tab and line breaks) and an
over-long value are refused with a ValueError naming the problem; the API turns it into a 422.
"""

from __future__ import annotations

import math
import re
from typing import Any

# How deep a JSON value (metadata) may nest.
MAX_JSON_DEPTH = 100
MAX_KEY_CHARS = 128  # a metadata or filter key
MAX_VALUE_CHARS = 10_000  # a metadata or filter string value
CONTROLS = r"\x00-\x1f\x7f-\x9f"
TEXT_CONTROLS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"  # Cc but tab, line feed and carriage return

def check_text(value: Any, what: str, *, limit: int | None = None, one_line: bool = False,
               blank_ok: bool = False) -> Any:
    """Raise ValueError, with a message naming the problem, for a string no field of the API takes: a NUL, a lone
    surrogate, a control character (one-line fields: any; free text: any but tab and line breaks), more than
    limit characters, or (unless blank_ok) nothing but whitespace. Anything else is returned for pydantic to type."""
    if not isinstance(value, str):
        return value
    if limit is not None and len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL character (U+0000)")
    bad = SURROGATE.search(value)
    if bad:
        raise ValueError(f"{what} contains an unpaired surrogate (U+{ord(bad.group()):04X}): it is not valid Unicode")
    bad = (_CONTROL if one_line else _TEXT_CONTROL).search(value)
    if bad:
        allowed = "" if one_line else " other than tab and line breaks"
        raise ValueError(f"{what} contains a control character{allowed} (U+{ord(bad.group()):04X})")
    if not blank_ok and not value.strip():
        raise ValueError(f"{what} is blank")
    return value


SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL = re.compile(f"[{CONTROLS}]")
_TEXT_CONTROL = re.compile(f"[{TEXT_CONTROLS}]")


def check_metadata(value: Any, what: str) -> None:
    """Raise ValueError for metadata no filter could name or the database could not store: keys of 1-128 characters
    on one line, strings of free text up to MAX_VALUE_CHARS, finite numbers, nested at most MAX_JSON_DEPTH."""
    stack: list[tuple[Any, str, int]] = [(value, what, 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{where[:60]}... is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, str):
            check_text(item, where, limit=MAX_VALUE_CHARS, blank_ok=True)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where} is {item!r}, not a finite number")
        elif isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"{where}: a key is empty")
                shown = quoted(key)
                check_text(key, f"{where}: the key {shown}", limit=MAX_KEY_CHARS, one_line=True, blank_ok=True)
                stack.append((sub, f"{where}.{shown}", depth + 1))
        elif isinstance(item, list):
            stack.extend((sub, f"{where}[{i}]", depth + 1) for i, sub in enumerate(item))


def quoted(key: str) -> str:
    """A key as a message may quote it: escaped, and cut to 60 characters."""
    escaped = key.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= 60 else escaped[:60] + "..."
