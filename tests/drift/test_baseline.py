"""``infermon baseline build``, run as a real subprocess on real files."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy import cli
from proxy.drift.baseline import cell
from proxy.drift.profile import OTHER_BIN, build_profile, load_profile

REPO = Path(__file__).resolve().parents[2]
INFERMON = [sys.executable, "-m", "proxy"]
TIMEOUT = 60


def run_build(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
              cwd: Path = REPO) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INFERMON_")}
    environ["PYTHONPATH"] = str(REPO)
    environ.update(env or {})
    return subprocess.run(
        [*INFERMON, "baseline", "build", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=TIMEOUT,
        cwd=cwd,
        env=environ,
        check=False,
    )


def _records(n: int = 300) -> list[dict[str, Any]]:
    r = random.Random(5)
    return [
        {
            "age": round(r.gauss(40, 12), 3),
            "city": r.choice(["paris", "lyon", "nice"]),
            "kids": r.randint(0, 3),
            "income": None if i % 10 == 0 else round(r.random() * 1000, 2),
            "pred": round(r.random(), 4),
        }
        for i in range(n)
    ]


def _csv(records: list[dict[str, Any]]) -> str:
    cols = list(records[0])
    lines = [",".join(cols)]
    lines += [",".join("" if rec[c] is None else str(rec[c]) for c in cols) for rec in records]
    return "\n".join(lines) + "\n"


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(rec) + "\n" for rec in records)


def _ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def _fails(result: subprocess.CompletedProcess[bytes]) -> str:
    """Exit 2, one line on stderr, no traceback; the line."""
    err = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_registered() -> None:
    assert "proxy.drift.baseline" in cli.COMMAND_MODULES


def test_csv(tmp_path: Path) -> None:
    records = _records()
    data = tmp_path / "train.csv"
    data.write_text(_csv(records))
    out = tmp_path / "profile.json"
    line = _ok(run_build(str(data), "--out", str(out), "--predictions", "pred"))
    assert line == (
        f"profiled 300 rows of {data}: 4 features (3 numeric, 1 categorical), 1 prediction column -> {out}\n"
    )
    profile = load_profile(str(out))
    assert profile.columns() == ["age", "city", "kids", "income"]
    assert [p.name for p in profile.predictions] == ["pred"]
    assert profile.rows == 300 and profile.source == str(data)
    # the same profile as build_profile makes from the records themselves
    expected = build_profile(records, predictions=["pred"], source=str(data))
    expected.created = profile.created
    assert profile == expected
    income = profile.get("income")
    assert income is not None and income.missing == 30 and income.count == 270
    assert not list(tmp_path.glob(".profile-*"))  # no temporary file left


def test_jsonl_with_options(tmp_path: Path) -> None:
    records = _records()
    data = tmp_path / "train.jsonl"
    data.write_text(_jsonl(records))
    out = tmp_path / "p.json"
    args = ["--columns", "kids,age", "--categorical", "kids", "--bins", "4", "--top-k", "2"]
    _ok(run_build(str(data), "--out", str(out), *args, "--sample-size", "7", "--seed", "3"))
    profile = load_profile(str(out))
    assert profile.columns() == ["kids", "age"] and profile.predictions == []
    kids, age = profile.features
    assert kids.kind == "categorical" and len(kids.categories) == 2 and kids.bins()[-1] == OTHER_BIN
    assert len(age.edges) == 3 and len(age.sample) == 7
    expected = build_profile(records, columns=["kids", "age"], categorical=["kids"], bins=4, top_k=2,
                             sample_size=7, seed=3, source=str(data))  # fmt: skip
    expected.created = profile.created
    assert profile == expected


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = _records()
    data = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(records), data, row_group_size=64)
    out = tmp_path / "p.json"
    _ok(run_build(str(data), "--out", str(out), "--columns", "age,city,income"))
    profile = load_profile(str(out))
    expected = build_profile(records, columns=["age", "city", "income"], source=str(data))
    expected.created = profile.created
    assert profile == expected
    # a Parquet file by its content, whatever its name
    renamed = tmp_path / "train.data"
    renamed.write_bytes(data.read_bytes())
    _ok(run_build(str(renamed), "--out", str(out)))
    assert load_profile(str(out)).columns() == ["age", "city", "kids", "income", "pred"]
    # and from standard input
    _ok(run_build("-", "--out", str(out), stdin=data.read_bytes()))
    assert load_profile(str(out)).rows == 300


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path) -> None:
    blocker = tmp_path / "site"
    (blocker / "pyarrow").mkdir(parents=True)
    (blocker / "pyarrow" / "__init__.py").write_text("raise ImportError('no pyarrow here')\n")
    data = tmp_path / "train.parquet"
    data.write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    result = run_build(str(data), "--out", str(tmp_path / "p.json"), env={"PYTHONPATH": f"{blocker}:{REPO}"})
    assert _fails(result) == f"{data}: reading Parquet needs pyarrow: pip install 'infermon[parquet]'"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_stdin_is_sniffed(tmp_path: Path, fmt: str) -> None:
    records = _records(50)
    text = _csv(records) if fmt == "csv" else _jsonl(records)
    out = tmp_path / "p.json"
    line = _ok(run_build("-", "--out", str(out), stdin=text.encode()))
    assert line.startswith("profiled 50 rows of <stdin>: 5 features")
    profile = load_profile(str(out))
    expected = build_profile(records, source="<stdin>")
    expected.created = profile.created
    assert profile == expected


def test_stdin_format_flag_and_stdout(tmp_path: Path) -> None:
    # a JSONL stream that starts with a blank line is still JSONL; --format makes it explicit anyway
    result = run_build("-", "--format", "jsonl", "--out", "-", stdin=b'\n{"a": 1}\n{"a": 2, "b": "x"}\n')
    assert result.returncode == 0, result.stderr.decode()
    doc = json.loads(result.stdout)
    assert doc["rows"] == 2 and [f["name"] for f in doc["features"]] == ["a", "b"]
    assert result.stderr.decode().strip().endswith("-> <stdout>")
    # NaN and Infinity as Python's json module writes them: missing, and a type mismatch
    result = run_build("-", "--out", "-", stdin=b'{"a": NaN}\n{"a": Infinity}\n{"a": 1.5}\n')
    assert result.returncode == 0, result.stderr.decode()
    a = json.loads(result.stdout)["features"][0]
    assert (a["count"], a["missing"]) == (1, 1)
    assert "; 1 value of the wrong type (a: 1) -> <stdout>" in result.stderr.decode()
    # a CSV whose first cell is "{" is CSV when told so
    result = run_build("-", "--format", "csv", "--out", "-", stdin=b"{x,y\n1,2\n")
    assert result.returncode == 0, result.stderr.decode()
    assert [f["name"] for f in json.loads(result.stdout)["features"]] == ["{x", "y"]


def test_gzip_and_csv_details(tmp_path: Path) -> None:
    data = tmp_path / "train.csv.gz"
    text = "\ufeffid , zip,score,flag\r\n1,01234,1e3,true\r\n2,75001,-.5,false\r\n\r\n3, 01234 ,NaN,true\r\n"
    data.write_bytes(gzip.compress(text.encode()))
    out = tmp_path / "p.json"
    _ok(run_build(str(data), "--out", str(out), "--categorical", "zip"))
    profile = load_profile(str(out))
    assert profile.rows == 3 and profile.columns() == ["id", "zip", "score", "flag"]
    zip_, score, flag = profile.features[1:]
    assert zip_.categories == ["01234", "75001"] and zip_.counts == [2, 1, 0]  # --categorical cells stay text
    assert score.kind == "numeric" and (score.count, score.missing) == (2, 1) and score.max == 1000.0
    assert flag.kind == "categorical" and flag.categories == ["true", "false"]


def test_cells() -> None:
    assert [cell(c) for c in ("1", "-2", "+3", "1.5", ".5", "5.", "1e3", "-1E-2", " 7 ")] == [
        1, -2, 3, 1.5, 0.5, 5.0, 1000.0, -0.01, 7,
    ]  # fmt: skip
    assert [cell(c) for c in ("", "  ", "1_000", "0x10", "1,5", "abc", "1e", "True")] == [
        None, None, "1_000", "0x10", "1,5", "abc", "1e", "True",
    ]  # fmt: skip
    nan, inf, minus = (cell(c) for c in ("NaN", "inf", "-Infinity"))
    assert nan != nan and inf == float("inf") and minus == float("-inf")


@pytest.mark.parametrize(
    ("name", "content", "args", "message"),
    [
        ("bad.csv", "a,b\n1,2\n3,4,5\n", [], "{path} line 3: 3 cells, but the header has 2 columns"),
        ("bad.csv", "a,b\n1,2\n3\n", [], "{path} line 3: 1 cells, but the header has 2 columns"),
        ("bad.csv", "a,a\n1,2\n", [], "{path} line 1: column 'a' appears twice in the header"),
        ("bad.csv", "a,,c\n1,2,3\n", [], "{path} line 1: column 2 of the header has no name"),
        ("bad.csv", "", [], "{path}: empty, no header row (a CSV file starts with a row of column names)"),
        ("bad.csv", 'a,b\n1,"2\n', [], "{path} line 2: not valid CSV: unexpected end of data"),
        ("bad.csv", b"a,b\n1,\xff\n", [], "{path} line 2: not UTF-8 text (invalid start byte at byte 3)"),
        ("bad.csv", "a,b\n", [], "{path}: no rows to profile"),
        ("bad.csv", "a,b\n1,2\n", ["--columns", "a,x,y"],
         "{path}: --columns names 'x', 'y', not a column of the data (its columns: a, b)"),
        ("bad.csv", "a,b\n1,2\n", ["--categorical", "z"],
         "{path}: --categorical names 'z', not a column of the data (its columns: a, b)"),
        ("bad.csv", "a,b\n1,2\n", ["--predictions", "p"],
         "{path}: --predictions names 'p', not a column of the data (its columns: a, b)"),
        ("bad.csv", "a,b\n1,2\n", ["--columns", "a,b", "--predictions", "b"],
         "{path}: column 'b' is both a feature and a prediction column"),
        ("bad.jsonl", '{"a": 1}\n{"a": 2,}\n', [], "{path} line 2: not valid JSON ("),
        ("bad.jsonl", '{"a": 1}\n\n[1, 2]\n', [], "{path} line 3: a JSON list, not an object (one object a line)"),
        ("bad.jsonl", '{"a": 1}\n', ["--columns", "a,b"],
         "{path}: selected column 'b' is in no row (the rows have: a)"),
        ("bad.parquet", "PAR1 but not really", [], "{path}: not a readable Parquet file ("),
        ("bad.csv.gz", b"\x1f\x8b\x08\x00garbage", [], "{path} line 1: cannot read: "),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, name: str, content: str | bytes, args: list[str], message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    out = tmp_path / "p.json"
    line = _fails(run_build(str(path), "--out", str(out), *args))
    assert line.startswith(message.format(path=path)), line
    assert not out.exists() and not list(tmp_path.glob(".profile-*"))


def test_files_that_cannot_be_opened(tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    data.write_text("a\n1\n")
    missing = tmp_path / "nope.csv"
    assert _fails(run_build(str(missing), "--out", str(tmp_path / "p.json"))) == (
        f"cannot read {missing}: No such file or directory"
    )
    nowhere = tmp_path / "no" / "such" / "dir" / "p.json"
    assert _fails(run_build(str(data), "--out", str(nowhere))) == f"cannot write {nowhere}: No such file or directory"


def test_bad_flags_are_usage_errors(tmp_path: Path) -> None:
    data = tmp_path / "train.csv"
    data.write_text("a\n1\n")
    for args in (["--bins", "1"], ["--top-k", "0"], ["--bins", "x"], ["--columns", "a,,b"], []):
        result = run_build(str(data), *([*args, "--out", str(tmp_path / "p.json")] if args else []))
        assert result.returncode == 2 and b"Traceback" not in result.stderr
        assert b"usage: infermon baseline build" in result.stderr


def test_an_existing_profile_is_replaced_only_when_the_new_one_is_complete(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    good = tmp_path / "good.csv"
    good.write_text("a\n1\n2\n")
    _ok(run_build(str(good), "--out", str(out)))
    before = out.read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text("a\n1\n2,3\n")
    _fails(run_build(str(bad), "--out", str(out)))
    assert out.read_bytes() == before
