"""A load check of an exported model's files (``save_pretrained`` output), run before ``from_pretrained`` reads them."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def check_export(directory: str | Path) -> None:
    """Refuse a damaged export before loading it, naming the file: a JSON file (config, tokenizer) that does not
    parse, a safetensors file whose header does not parse or whose size is not what its header says (truncated, or
    not safetensors). A load check, not a checksum: it finds what a lost node leaves (a cut file), not a flipped bit
    inside a tensor."""
    directory = Path(directory)
    for path in sorted(directory.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: corrupt or truncated JSON in the exported model ({exc})") from None
    for path in sorted(directory.glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                if header_size > size - 8:
                    raise ValueError(f"header of {header_size} bytes in a file of {size}")
                header = json.loads(f.read(header_size))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            if size != 8 + header_size + end:
                raise ValueError(f"{size} bytes, its header describes {8 + header_size + end}")
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
