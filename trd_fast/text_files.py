"""Text files the project reads: always UTF-8, whatever the machine's locale, with errors naming the place."""

from __future__ import annotations

from pathlib import Path


def read_utf8(path: str | Path) -> str:
    """The text of `path` decoded as UTF-8 (a leading byte-order mark dropped). Raises ValueError naming the
    file, the line and the column of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - data.rfind(b"\n", 0, error.start)
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column})") \
            from None
