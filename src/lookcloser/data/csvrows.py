"""Reading the CSV files users give (data.source=csv, --meta): rows with their line numbers,
and one-line errors naming the file and line for text that is not UTF-8 or a row that does
not fit the header."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path

from lookcloser.errors import DataError


def read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the rows of a UTF-8 CSV (an Excel BOM is fine), each with its line.

    A row with more fields than the header, an empty column name or a byte that is not
    UTF-8 is a DataError naming the file and line. Missing trailing fields read as "".
    """
    try:
        with path.open("rb") as f:
            reader = csv.reader(_decoded_lines(f, path))
            header = next(reader, [])
            if any(not name.strip() for name in header):
                raise DataError(f"{path}:1: empty column name in the header {header}")
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise DataError(f"{path}:1: column(s) {', '.join(repeated)} appear twice")
            rows = []
            for fields in reader:
                if not fields:
                    continue
                if len(fields) > len(header):
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(fields)} fields, but the header has "
                        f"{len(header)} columns ({', '.join(header)}); quote cells that "
                        "contain a comma"
                    )
                fields += [""] * (len(header) - len(fields))
                rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    except csv.Error as err:
        raise DataError(f"{path}: not a valid CSV file ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    return header, rows


def _decoded_lines(f, path: Path) -> Iterator[str]:
    # Line by line, so a byte that is not UTF-8 is reported with its line, not a buffer offset.
    number = 0
    for raw in f:
        number += 1
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            byte = raw[err.start]
            raise DataError(
                f"{path}:{number}: not UTF-8 text (byte 0x{byte:02x} at column {err.start + 1}); "
                "save the file as UTF-8"
            ) from None
        # Old Mac line ends (a lone \r) split a line too, as in text mode.
        pieces = [p for p in _LONE_CR.split(text) if p]
        number += len(pieces) - 1
        yield from pieces


_LONE_CR = re.compile(r"(?<=\r)(?!\n)")
