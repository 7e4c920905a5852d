"""Dataset files as a stream of numbered records: JSON Lines, one JSON array, CSV, Parquet, and a folder written by
Hugging Face datasets' ``save_to_disk``. Nothing is read whole: JSON arrays are decoded record by record from
buffered chunks, Parquet and Arrow batch by batch, so memory is bounded by one record (or one batch), not the file.

Every problem is a `Row` with an error and a number: the line for JSON Lines and CSV (what an editor shows), the
record (1-based) for JSON arrays, Parquet and saved datasets; a file-level problem has number 0. A JSON array
cannot be resynchronised after a broken record, so its reader stops there; the other readers go on.

An optional UTF-8 byte-order mark and CRLF line ends are accepted everywhere. Free of torch; pyarrow is imported
only for Parquet and saved datasets (the trainer extra has it).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FileFormat = Literal["auto", "jsonl", "json", "csv", "parquet", "datasets"]

# A sample longer than this is refused (DatasetInvalid naming the line), not parsed: far above any
# maxSequenceLength in text, and it bounds what one hostile line costs the parser.
MAX_LINE_BYTES = 1 << 20
CHUNK_CHARS = 1 << 16
ARROW_BATCH_ROWS = 256
BOM = b"\xef\xbb\xbf"
# save_to_disk's files: one split (state.json lists its Arrow files) or several (dataset_dict.json names them).
DATASET_STATE = "state.json"
DATASET_DICT = "dataset_dict.json"


class FileError(Exception):
    """The file cannot be opened as the format at all (DatasetNotFound or DatasetInvalid for the caller)."""


@dataclass(frozen=True)
class Row:
    """One record (value) or one problem (error), with its line or record number (0: the whole file)."""

    number: int
    value: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class RecordFile:
    """A dataset file opened for reading: its detected format, the unit its numbers count, and its rows."""

    format: FileFormat
    unit: Literal["line", "record"]
    rows: Iterator[Row]

    def where(self, number: int) -> str:
        return f"{self.unit} {number}" if number else "the file"


def detect_format(path: Path) -> FileFormat:
    """auto: a folder is a saved dataset; .parquet and .csv by name; otherwise JSON, an array when the first
    character (after a byte-order mark and blanks) is '[', else JSON Lines."""
    if path.is_dir():
        return "datasets"
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        return "csv"
    with open(path, "rb") as f:
        head = f.read(4096)
        while head.strip() == b"" or head == BOM:
            more = f.read(4096)
            if not more:
                break
            head = head.removeprefix(BOM).lstrip() + more
    return "json" if head.removeprefix(BOM).lstrip()[:1] == b"[" else "jsonl"


def open_records(path: str | Path, file_format: FileFormat = "auto", max_bytes: int = MAX_LINE_BYTES) -> RecordFile:
    """The file's rows, lazily; FileNotFoundError when absent, FileError when it cannot be read as the format."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(str(path))
    fmt = detect_format(path) if file_format == "auto" else file_format
    if fmt == "datasets" and not path.is_dir():
        raise FileError(f"fileFormat datasets is a folder written by save_to_disk; {path.name} is a file")
    if fmt != "datasets" and path.is_dir():
        raise FileError(f"a folder is read as a saved dataset (fileFormat datasets or auto), not as {fmt}")
    if fmt == "jsonl":
        return RecordFile(fmt, "line", _jsonl(path, max_bytes))
    if fmt == "json":
        return RecordFile(fmt, "record", _json_array(path, max_bytes))
    if fmt == "csv":
        return RecordFile(fmt, "line", _csv(path, max_bytes))
    if fmt == "parquet":
        return RecordFile(fmt, "record", _parquet(path))
    return RecordFile(fmt, "record", _saved_dataset(path))


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {list: "an array", str: "a string", int: "a number", float: "a number", dict: "an object"}.get(
        type(value), type(value).__name__
    )


# -- JSON Lines --------------------------------------------------------------------------------------------------


def _jsonl(path: Path, max_bytes: int) -> Iterator[Row]:
    with open(path, "rb") as f:
        number = 0
        while True:
            line = f.readline(max_bytes + 2)  # room for the line's own CRLF
            if not line:
                return
            number += 1
            complete = line.endswith(b"\n") or len(line) < max_bytes + 2
            if number == 1:
                line = line.removeprefix(BOM)
            size = len(line.rstrip(b"\r\n"))
            while not complete:  # overlong: skip to its end without keeping it
                more = f.readline(1 << 20)
                size += len(more.rstrip(b"\r\n"))
                complete = not more or more.endswith(b"\n")
            if size > max_bytes:
                limit = f"over the {max_bytes}-byte limit of one sample: shorten or split it"
                yield Row(number, error=f"{size} bytes, {limit}")
                continue
            if not line.strip():
                continue
            yield _json_row(number, line)


def _json_row(number: int, line: bytes) -> Row:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Row(number, error=f"not UTF-8 (byte {e.start})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return Row(number, error=f"invalid JSON ({e.msg} at column {e.colno})")
    except RecursionError:  # json recurses per nesting level: [[[[... is refused, never a crash
        return Row(number, error="JSON nested too deeply: a sample is an object of strings and lists")
    return _object_row(number, value)


def _object_row(number: int, value: Any) -> Row:
    if not isinstance(value, dict):
        return Row(number, error=f"expected a JSON object, got {json_type(value)}")
    return Row(number, value)


# -- one JSON array ----------------------------------------------------------------------------------------------


class _Buffer:
    """Text of a file read in chunks, with the position of the next unread character and its line number."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.text = ""
        self.pos = 0
        self.eof = False
        self.base_line = 1  # line number of text[0]

    def fill(self) -> bool:
        """Read one more chunk, dropping what is consumed; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.f.read(CHUNK_CHARS)
        self.base_line += self.text.count("\n", 0, self.pos)
        self.text, self.pos = self.text[self.pos :] + chunk, 0
        self.eof = not chunk
        return bool(chunk)

    def peek(self) -> str:
        """The next non-blank character ('' at the end), consumed blanks skipped."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.text) or not self.fill():
                return self.text[self.pos : self.pos + 1]

    def line_col(self, pos: int) -> str:
        line = self.base_line + self.text.count("\n", 0, pos)
        return f"line {line} column {pos - self.text.rfind(chr(10), 0, pos)}"


def _incomplete(error: json.JSONDecodeError, text: str) -> bool:
    """Whether decoding failed only because the buffer ends inside the value (more text may complete it)."""
    return error.pos >= len(text) - 6 or error.msg.startswith("Unterminated string")


def _json_array(path: Path, max_bytes: int) -> Iterator[Row]:
    decoder = json.JSONDecoder()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            buf = _Buffer(f)
            if buf.peek() != "[":
                yield Row(0, error="expected one JSON array of objects (for one object per line use fileFormat jsonl)")
                return
            buf.pos += 1
            number = 0
            while True:
                char = buf.peek()
                if char == "]":
                    buf.pos += 1
                    if buf.peek():
                        yield Row(0, error=f"text after the array's closing ']' at {buf.line_col(buf.pos)}")
                    return
                if number:
                    if char != ",":
                        where = buf.line_col(buf.pos) if char else "the end of the file"
                        yield Row(number + 1, error=f"expected ',' or ']' after record {number} at {where}")
                        return
                    buf.pos += 1
                    char = buf.peek()
                number += 1
                if not char:
                    yield Row(number, error="the file ends inside the array (no closing ']')")
                    return
                row, ok = _decode_one(decoder, buf, number, max_bytes)
                yield row
                if not ok:
                    return
    except UnicodeDecodeError as e:
        yield Row(0, error=f"not UTF-8 (byte {e.start} of a chunk): save the file as UTF-8")


def _decode_one(decoder: json.JSONDecoder, buf: _Buffer, number: int, max_bytes: int) -> tuple[Row, bool]:
    """The record at buf.pos and whether reading can go on after it."""
    while True:
        try:
            value, end = decoder.raw_decode(buf.text, buf.pos)
        except json.JSONDecodeError as e:
            if _incomplete(e, buf.text) and not buf.eof:
                if len(buf.text) - buf.pos > max_bytes:
                    return Row(
                        number, error=f"over the {max_bytes}-byte limit of one sample: shorten or split it"
                    ), False
                buf.fill()
                continue
            return Row(number, error=f"invalid JSON ({e.msg} at {buf.line_col(e.pos)})"), False
        except RecursionError:
            return Row(number, error="JSON nested too deeply: a sample is an object of strings and lists"), False
        if end == len(buf.text) and not buf.eof:  # a number may go on in the next chunk
            buf.fill()
            continue
        size = end - buf.pos
        buf.pos = end
        if size > max_bytes:
            return Row(number, error=f"over the {max_bytes}-byte limit of one sample: shorten or split it"), True
        return _object_row(number, value), True


# -- CSV ---------------------------------------------------------------------------------------------------------


def _csv(path: Path, max_bytes: int) -> Iterator[Row]:
    """One record per row under a header row; every value is a string (an empty cell is a missing field)."""
    csv.field_size_limit(max(csv.field_size_limit(), max_bytes))
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            if len(set(header)) != len(header) or any(not name.strip() for name in header):
                yield Row(1, error=f"the header row needs distinct, non-empty column names, got {header}")
                return
            start = reader.line_num + 1
            for cells in reader:
                number, start = start, reader.line_num + 1
                if not any(cell.strip() for cell in cells):
                    continue
                if len(cells) != len(header):
                    yield Row(number, error=f"{len(cells)} cells, the header has {len(header)}")
                    continue
                yield Row(number, {name: cell for name, cell in zip(header, cells, strict=True) if cell != ""})
        except UnicodeDecodeError as e:
            yield Row(start, error=f"not UTF-8 (byte {e.start} of a chunk): save the file as UTF-8")
        except csv.Error as e:
            yield Row(reader.line_num, error=f"invalid CSV ({e})")


# -- Parquet and saved datasets (Arrow) -------------------------------------------------------------------------


def _rows_of_batches(batches: Iterator[Any], first: int) -> Iterator[Row]:
    number = first
    for batch in batches:
        for value in batch.to_pylist():
            number += 1
            yield _object_row(number, value)


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=ARROW_BATCH_ROWS)
        yield from _rows_of_batches(batches, 0)
    except (pa.ArrowException, OSError) as e:
        yield Row(0, error=f"not a readable Parquet file ({e})")


def saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a save_to_disk folder, in order: its own (state.json), or its train split's
    (dataset_dict.json); FileError naming what is missing."""
    if (folder / DATASET_DICT).is_file() and not (folder / DATASET_STATE).is_file():
        splits = _json_file(folder / DATASET_DICT).get("splits") or []
        if "train" not in splits:
            raise FileError(f"the saved DatasetDict has no train split (splits: {splits}): point the uri at a split")
        folder = folder / "train"
    state = folder / DATASET_STATE
    if not state.is_file():
        raise FileError(f"{folder.name} is not a folder written by save_to_disk (no {DATASET_STATE} or {DATASET_DICT})")
    files = []
    for entry in _json_file(state).get("_data_files") or []:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise FileError(f"{DATASET_STATE} names an odd data file {name!r}")
        if not (folder / name).is_file():
            raise FileError(f"{DATASET_STATE} names {name}, which is missing from the folder")
        files.append(folder / name)
    return files


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise FileError(f"{path.name} cannot be read as JSON ({e})") from e
    if not isinstance(value, dict):
        raise FileError(f"{path.name} is not a JSON object")
    return value


def _saved_dataset(folder: Path) -> Iterator[Row]:
    import pyarrow as pa

    try:
        files = saved_dataset_files(folder)
    except FileError as e:
        yield Row(0, error=str(e))
        return
    number = 0
    for path in files:
        try:
            with pa.memory_map(str(path)) as source:
                for row in _rows_of_batches(_arrow_batches(source), number):
                    number = row.number
                    yield row
        except (pa.ArrowException, OSError) as e:
            yield Row(0, error=f"{path.name} is not a readable Arrow file ({e})")
            return


def _arrow_batches(source: Any) -> Iterator[Any]:
    """Record batches of an Arrow IPC stream (what datasets writes) or, failing that, an Arrow IPC file."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        stream = ipc.open_stream(source)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = ipc.open_file(source)
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)
        return
    yield from stream
