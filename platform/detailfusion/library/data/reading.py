"""Shared pieces of the annotation readers: the result container, safe JSON loading, field checks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from detailfusion.library.data.schema import Quarantined


@dataclass
class ReadResult:
    """Canonical rows of one split plus what was set aside (``bad``) or kept with a note (``warnings``)."""

    triplets: list[dict] = field(default_factory=list)
    gallery: list[dict] = field(default_factory=list)
    bad: list[Quarantined] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def load_json(path: Path, expected: type, result: ReadResult):
    """Parsed JSON of ``path`` if it is a ``expected`` (list / dict); otherwise quarantine the file, return None."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        result.bad.append(Quarantined(str(path), "-", "file not found", "file"))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        result.bad.append(Quarantined(str(path), "-", f"cannot read: {exc}", "file"))
        return None
    except json.JSONDecodeError as exc:
        result.bad.append(Quarantined(str(path), f"line {exc.lineno}", f"malformed JSON: {exc.msg}", "file"))
        return None
    if not isinstance(data, expected):
        result.bad.append(Quarantined(str(path), "-", f"top level is {type(data).__name__}, expected {expected.__name__}", "file"))
        return None
    return data


def require_fields(record, fields) -> str | None:
    """None if ``record`` is a mapping holding every field with a non-null value, else what is wrong."""
    if not isinstance(record, dict):
        return f"record is {type(record).__name__}, not an object"
    missing = [f for f in fields if record.get(f) is None]
    return f"missing field(s): {', '.join(missing)}" if missing else None
