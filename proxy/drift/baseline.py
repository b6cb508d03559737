"""``infermon baseline build DATA --out profile.json``: a reference profile from training data.

DATA is a CSV file (a header row; cells that read as numbers are numbers, empty cells are missing),
a JSONL file (one JSON object per line), a Parquet file (with pyarrow: ``pip install
'infermon[parquet]'``), or ``-`` for standard input (CSV or JSONL told apart by the first byte, or
``--format``). A ``.gz`` name is read through gzip. The rows stream through
:func:`proxy.drift.profile.build_profile`; only numeric columns' values are held (for the quantiles).

Bad input is one line naming the file and the line (or column) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import IO, TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from proxy.drift.profile import Profile

FORMATS = ("csv", "jsonl", "parquet")
_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
               ".pq": "parquet"}  # fmt: skip
#: a CSV cell that is a number: an integer when none of the groups (fraction, exponent) took part
_NUMBER = re.compile(r"[+-]?(?:\d+(\.\d*)?|(\.\d+))([eE][+-]?\d+)?", re.ASCII)
_SPECIAL = {"nan": math.nan, "-nan": math.nan, "+nan": math.nan, "inf": math.inf, "+inf": math.inf,
            "-inf": -math.inf, "infinity": math.inf, "+infinity": math.inf, "-infinity": -math.inf}  # fmt: skip
PARQUET_HINT = "pip install 'infermon[parquet]'"
_BATCH = 8192  # Parquet rows decoded at a time


class DataError(Exception):
    """The input cannot be read. ``str(exc)`` is one line naming the file and the line or column."""


def cell(text: str) -> Any:
    """A CSV cell as a value: a number when it reads as one, None when empty, else the text."""
    s = text.strip()
    if not s:
        return None
    m = _NUMBER.fullmatch(s)
    if m is not None:
        return int(s) if m.lastindex is None else float(s)
    special = _SPECIAL.get(s.lower())
    return text if special is None else special


def _columns(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{value!r}: comma-separated column names, none of them empty")
    return names


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"{n} is not from {lo} to {hi}")
        return n

    return parse


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "baseline",
        help="build a reference profile for drift detection from training data",
        description="Reference profiles for drift detection (see docs/drift.md).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser(
        "build",
        help="profile a CSV, JSONL or Parquet file",
        description="Profile training or validation data: per numeric feature quantile bins, mean, std, min, "
        "max and a seeded sample; per categorical feature the top K values plus other.",
    )
    build.add_argument("data", metavar="DATA", help="CSV, JSONL or Parquet file; - for standard input")
    build.add_argument("--out", required=True, metavar="FILE", help="where to write the profile (- for stdout)")
    build.add_argument("--format", choices=FORMATS, help="the input's format (default: from the name or content)")
    build.add_argument("--columns", type=_columns, metavar="A,B,C", help="the features, in this order (default: all)")
    build.add_argument("--categorical", type=_columns, default=[], metavar="X,Y", help="columns that are categorical")
    build.add_argument("--predictions", type=_columns, default=[], metavar="P", help="prediction columns")
    build.add_argument("--bins", type=_int_in(2, 100), default=10, help="quantile bins per numeric feature (10)")
    build.add_argument("--top-k", type=_int_in(1, 1000), default=20, help="categories kept per feature (20)")
    build.add_argument("--sample-size", type=_int_in(0, 1_000_000), default=1000, help="values sampled (1000)")
    build.add_argument("--seed", type=int, default=0, help="seed of the sample (0)")
    build.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    # numpy comes with the profile module: loaded when a profile is built, not by every command
    from proxy.drift.profile import ProfileError

    try:
        profile, written = run(args)
    except (DataError, ProfileError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(summary(profile, written), file=sys.stderr if args.out == "-" else sys.stdout)
    return 0


def summary(profile: Profile, written: str) -> str:
    numeric = sum(1 for f in profile.features if f.kind == "numeric")
    text = (
        f"profiled {profile.rows} rows of {profile.source}: {len(profile.features)} features "
        f"({numeric} numeric, {len(profile.features) - numeric} categorical)"
    )
    if profile.predictions:
        text += f", {len(profile.predictions)} prediction column{'s' if len(profile.predictions) > 1 else ''}"
    mismatched = {
        f.name: n for f in (*profile.features, *profile.predictions) if (n := profile.rows - f.count - f.missing)
    }
    if mismatched:
        names = ", ".join(f"{k}: {v}" for k, v in list(mismatched.items())[:3])
        more = ", ..." if len(mismatched) > 3 else ""
        total = sum(mismatched.values())
        text += f"; {total} value{'s' if total > 1 else ''} of the wrong type ({names}{more})"
    return f"{text} -> {written}"


def run(args: argparse.Namespace) -> tuple[Profile, str]:
    """Read, profile, write; raises DataError or ProfileError."""
    from proxy.drift.profile import build_profile

    name = "<stdin>" if args.data == "-" else args.data
    out = _Output(args.out)  # a directory that is not there fails before the data is read
    try:
        with _open(args.data) as raw:
            fmt = args.format or _format_of(args.data, raw)
            rows = _reader(fmt, raw, name)
            wanted = args.columns
            profile = build_profile(
                rows(wanted, [*args.predictions], [*args.categorical]),
                columns=wanted,
                categorical=args.categorical,
                predictions=args.predictions,
                bins=args.bins,
                top_k=args.top_k,
                sample_size=args.sample_size,
                seed=args.seed,
                source=name,
            )
        out.write(profile.to_json())
    finally:
        out.discard()
    return profile, out.name


Rows = Callable[[list[str] | None, list[str], list[str]], Iterator[dict[str, Any]]]


class _Output:
    """The profile goes to a temporary file beside its place, renamed into place when complete."""

    def __init__(self, path: str) -> None:
        self.name = "<stdout>" if path == "-" else path
        self.path = path
        self.tmp: str | None = None
        if path != "-":
            try:
                fd, self.tmp = tempfile.mkstemp(prefix=".profile-", suffix=".tmp", dir=os.path.dirname(path) or ".")
                os.close(fd)
            except OSError as exc:
                raise DataError(f"cannot write {path}: {exc.strerror or exc}") from None

    def write(self, data: bytes) -> None:
        if self.tmp is None:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
            return
        try:
            with open(self.tmp, "wb") as fh:
                fh.write(data)
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise DataError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


class _Prefixed(io.RawIOBase):
    """Bytes already read (to tell the format), then the rest of the stream."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self.head = head
        self.rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.rest.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _open(path: str) -> IO[bytes]:
    if path == "-":
        stdin: io.BufferedReader = sys.stdin.buffer  # type: ignore[assignment]
        head = b""
        while len(head) < 4:
            more = stdin.read1(65536)
            if not more:
                break
            head += more
        return io.BufferedReader(_Prefixed(head, stdin))
    try:
        raw: IO[bytes] = open(path, "rb")  # noqa: SIM115 (closed by the caller's with)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.endswith(".gz"):
        return gzip.open(raw, "rb")  # type: ignore[return-value]
    return raw


def _peek(raw: IO[bytes]) -> bytes:
    peek = getattr(raw, "peek", None)
    return peek(64) if peek is not None else b""


def _format_of(path: str, raw: IO[bytes]) -> str:
    base = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(base)[1].lower()
    if path != "-" and ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    try:
        head = _peek(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        return "jsonl"
    return "csv"


def _reader(fmt: str, raw: IO[bytes], name: str) -> Rows:
    if fmt == "csv":
        return lambda wanted, predictions, categorical: _csv_rows(raw, name, wanted, predictions, set(categorical))
    if fmt == "jsonl":
        return lambda wanted, predictions, categorical: _jsonl_rows(raw, name)
    return lambda wanted, predictions, categorical: _parquet_rows(raw, name, wanted, predictions, categorical)


def _unknown(name: str, flag: str, missing: list[str], have: list[str]) -> DataError:
    listed = ", ".join(repr(m) for m in missing)
    return DataError(f"{name}: {flag} names {listed}, not a column of the data (its columns: {', '.join(have)})")


def _check_names(name: str, have: list[str], wanted: list[str] | None, predictions: list[str],
                 categorical: list[str]) -> None:  # fmt: skip
    known = set(have)
    for flag, names in (("--columns", wanted or []), ("--predictions", predictions), ("--categorical", categorical)):
        missing = [n for n in names if n not in known]
        if missing:
            raise _unknown(name, flag, missing, have)


def _text_lines(raw: IO[bytes], name: str) -> Iterator[str]:
    """Lines decoded one by one, so a bad byte is reported on its line."""
    for n, data in enumerate(raw, 1):
        if n == 1 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{name} line {n}: not UTF-8 text ({exc.reason} at byte {exc.start + 1})") from None


def _csv_rows(raw: IO[bytes], name: str, wanted: list[str] | None, predictions: list[str],
              categorical: set[str]) -> Iterator[dict[str, Any]]:  # fmt: skip
    reader = csv.reader(_text_lines(raw, name), strict=True)
    where = f"{name} line 1"
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{name}: empty, no header row (a CSV file starts with a row of column names)")
        header = [h.strip() for h in header]
        for i, h in enumerate(header):
            if not h:
                raise DataError(f"{name} line 1: column {i + 1} of the header has no name")
            if h in header[:i]:
                raise DataError(f"{name} line 1: column {h!r} appears twice in the header")
        _check_names(name, header, wanted, predictions, sorted(categorical))
        keep = set(wanted) | set(predictions) if wanted is not None else set(header)
        # --categorical cells stay text as written (a zip code keeps its leading zero)
        plan = [(i, h, h in categorical) for i, h in enumerate(header) if h in keep]
        width = len(header)
        for cells in reader:
            if not cells or (len(cells) == 1 and not cells[0].strip() and width > 1):
                continue  # a blank line
            if len(cells) != width:
                where = f"{name} line {reader.line_num}"
                raise DataError(f"{where}: {len(cells)} cells, but the header has {width} columns")
            row: dict[str, Any] = {}
            for i, h, text_only in plan:
                c = cells[i]
                row[h] = (c.strip() or None) if text_only else cell(c)
            yield row
    except csv.Error as exc:
        raise DataError(f"{name} line {reader.line_num}: not valid CSV: {exc}") from None
    except (OSError, EOFError) as exc:  # a truncated or corrupt .gz
        raise DataError(f"{name} line {reader.line_num + 1}: cannot read: {exc}") from None


def _jsonl_rows(raw: IO[bytes], name: str) -> Iterator[dict[str, Any]]:
    line = 0
    try:
        for data in raw:
            line += 1
            if line == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            if not data.strip():
                continue
            try:
                row = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                row = _lenient(data)  # NaN and Infinity, as Python's json module writes them
                if row is None:
                    raise DataError(f"{name} line {line}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{name} line {line}: a JSON {type(row).__name__}, not an object (one object a line)")
            yield row
    except (OSError, EOFError) as exc:
        raise DataError(f"{name} line {line + 1}: cannot read: {exc}") from None


def _lenient(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, Decimal) else value


def _parquet_rows(raw: IO[bytes], name: str, wanted: list[str] | None, predictions: list[str],
                  categorical: list[str]) -> Iterator[dict[str, Any]]:  # fmt: skip
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{name}: reading Parquet needs pyarrow: {PARQUET_HINT}") from None
    try:
        source: Any = raw if raw.seekable() else pa.BufferReader(raw.read())
        file = pq.ParquetFile(source)
        have = list(file.schema_arrow.names)
        _check_names(name, have, wanted, predictions, categorical)
        selected = None if wanted is None else [*wanted, *predictions]
        for batch in file.iter_batches(batch_size=_BATCH, columns=selected):
            for row in batch.to_pylist():
                yield {k: _plain(v) for k, v in row.items()}
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{name}: not a readable Parquet file ({exc})") from None
