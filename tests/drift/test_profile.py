"""Reference profiles: built in one pass, binned as numpy bins, read back exactly, refused clearly."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.drift.profile import (
    DISTINCT_CAP,
    FORMAT,
    OTHER_BIN,
    VERSION,
    FeatureProfile,
    Profile,
    ProfileError,
    build_profile,
    category_of,
    is_missing,
    load_profile,
)


def _rows(n: int = 2000, seed: int = 1) -> list[dict[str, Any]]:
    r = random.Random(seed)
    return [
        {
            "age": r.gauss(40, 12),
            "city": r.choice(["paris", "lyon", "nice", "lille"]),
            "kids": r.randint(0, 3),
            "score": None if r.random() < 0.1 else r.random() * 100,
            "label": r.random() < 0.3,
        }
        for _ in range(n)
    ]


def _counts_by_bin_of(f: FeatureProfile, values: list[Any]) -> list[int]:
    counts = [0] * len(f.bins())
    for v in values:
        b = f.bin_of(v)
        if b is not None:
            counts[b] += 1
    return counts


# -- numeric -------------------------------------------------------------------------------------


def test_numeric_edges_are_numpy_quantiles_collapsed() -> None:
    rows = _rows()
    f = build_profile(rows).get("age")
    assert f is not None and f.kind == "numeric"
    values = np.array([r["age"] for r in rows])
    assert f.edges == list(np.unique(np.quantile(values, [k / 10 for k in range(1, 10)])))
    assert len(f.edges) == 9 and len(f.counts) == 10
    expected = np.bincount(np.searchsorted(np.array(f.edges), values, side="left"), minlength=10)
    assert f.counts == expected.tolist()
    assert f.count == 2000 and f.missing == 0 and f.distinct == 2000
    assert f.mean == pytest.approx(float(values.mean()), rel=1e-12)
    assert f.std == pytest.approx(float(values.std(ddof=0)), rel=1e-12)
    assert (f.min, f.max) == (float(values.min()), float(values.max()))


def test_bin_of_agrees_with_the_reference_counts() -> None:
    rows = _rows()
    profile = build_profile(rows, categorical=["kids"])
    for f in profile.features:
        assert _counts_by_bin_of(f, [r[f.name] for r in rows]) == f.counts, f.name
    age = profile.get("age")
    assert age is not None
    assert age.bin_of(age.edges[0]) == 0  # v <= edges[0] -> bin 0
    assert age.bin_of(math.nextafter(age.edges[0], math.inf)) == 1
    assert age.bin_of(-1e300) == 0 and age.bin_of(1e300) == len(age.edges)
    assert age.bin_of(40) == age.bin_of(40.0)


def test_coinciding_quantiles_collapse_into_fewer_bins() -> None:
    values = [0.0] * 900 + [float(i) for i in range(1, 101)]
    f = build_profile([{"x": v} for v in values]).get("x")
    assert f is not None
    assert f.edges == sorted(set(np.quantile(values, [k / 10 for k in range(1, 10)]).tolist()))
    assert len(f.edges) < 9
    assert all(a < b for a, b in zip(f.edges, f.edges[1:], strict=False))
    assert sum(f.counts) == 1000 and f.counts[0] == 900


def test_few_distinct_values_get_one_bin_each() -> None:
    rows = [{"k": v} for v in [3, 1, 2, 2, 3, 3, 10] * 5]
    f = build_profile(rows).get("k")
    assert f is not None
    assert f.edges == [1.0, 2.0, 3.0]  # the sorted distinct values but the last
    assert f.counts == [5, 10, 15, 5]
    assert f.bins() == ["0", "1", "2", "3"]
    assert [f.bin_of(v) for v in (1, 2, 3, 10, 0, 2.5, 99)] == [0, 1, 2, 3, 0, 2, 3]
    assert f.distinct == 4 and not f.binary


def test_constant_column_is_one_bin() -> None:
    f = build_profile([{"c": 7}] * 50).get("c")
    assert f is not None
    assert f.edges == [] and f.counts == [50] and f.bins() == ["0"]
    assert f.std == 0.0 and f.mean == f.min == f.max == 7.0
    assert f.proportions() == [1.0]
    assert f.bin_of(-5) == f.bin_of(1e9) == 0


def test_binary_numeric_column() -> None:
    f = build_profile([{"b": i % 2} for i in range(10)]).get("b")
    assert f is not None and f.binary and f.counts == [5, 5] and f.proportions() == [0.5, 0.5]


def test_missing_and_type_mismatches() -> None:
    rows: list[dict[str, Any]] = [
        {"x": 1.0},
        {"x": None},
        {"x": math.nan},
        {"x": ""},
        {},  # absent: missing
        {"x": math.inf},  # infinities are type mismatches, never values
        {"x": -math.inf},
        {"x": [1, 2]},  # so is anything not scalar
        {"x": 10**400},  # and an integer no float can hold
        {"x": 2},
    ]
    f = build_profile(rows).get("x")
    assert f is not None and f.kind == "numeric"
    assert (f.count, f.missing) == (2, 4)
    assert 10 - f.count - f.missing == 4  # the mismatches
    assert (f.min, f.max) == (1.0, 2.0)
    for value in (None, math.nan, "", math.inf, -math.inf, "3", True, [1], 10**400):
        assert f.bin_of(value) is None, value
    assert all(is_missing(v) for v in (None, "", math.nan))
    assert not any(is_missing(v) for v in (0, 0.0, "0", False, math.inf))


def test_huge_values_never_make_infinity() -> None:
    rows = [{"x": v} for v in [1.7e308, -1.7e308, 1.6e308, 1e308, -1e308] * 3 + [0.0, 1.0, 2.0]]
    profile = build_profile(rows, bins=4)
    f = profile.get("x")
    assert f is not None
    for v in (f.mean, f.std, f.min, f.max, *f.edges):
        assert v is not None and math.isfinite(v)
    assert f.min is not None and f.mean is not None and f.min <= f.mean <= 1.7e308
    assert _counts_by_bin_of(f, [r["x"] for r in rows]) == f.counts
    assert b"NaN" not in profile.to_json() and b"Infinity" not in profile.to_json()


def test_distinct_is_exact_up_to_the_cap() -> None:
    profile = build_profile(
        [{"n": float(i), "s": f"v{i}", "few": i % 3} for i in range(DISTINCT_CAP + 50)],
        top_k=5,
    )
    n, s, few = profile.features
    assert n.distinct == s.distinct == DISTINCT_CAP + 1
    assert few.distinct == 3
    exact = build_profile([{"n": float(i)} for i in range(DISTINCT_CAP)]).features[0]
    assert exact.distinct == DISTINCT_CAP


def test_all_missing_column() -> None:
    f = build_profile([{"x": None, "y": 1}] * 5).get("x")
    assert f is not None
    assert f.kind == "numeric" and f.count == 0 and f.missing == 5 and f.counts == [0]
    assert f.mean is None and f.proportions() == [0.0]


# -- categorical ---------------------------------------------------------------------------------


def test_categorical_top_k_ties_by_value_and_other() -> None:
    values = ["b"] * 5 + ["a"] * 5 + ["c"] * 3 + ["d"] * 3 + ["e"] * 1
    random.Random(3).shuffle(values)
    f = build_profile([{"c": v} for v in values], top_k=3).get("c")
    assert f is not None and f.kind == "categorical"
    assert f.categories == ["a", "b", "c"]  # 5, 5, then c before d at 3
    assert f.counts == [5, 5, 3, 4]
    assert f.bins() == ["a", "b", "c", OTHER_BIN]
    assert f.distinct == 5 and f.count == 17
    assert [f.bin_of(v) for v in ("a", "c", "d", "zzz", OTHER_BIN)] == [0, 2, 3, 3, 3]
    assert f.bin_of(None) is None and f.bin_of("") is None
    assert f.mean is None and f.edges == []
    assert _counts_by_bin_of(f, values) == f.counts


def test_numbers_and_booleans_as_categories() -> None:
    assert [category_of(v) for v in (True, False, 1, 1.0, -0.0, 1.5, "x", 2**53, 2**60, 1e20)] == [
        "true", "false", "1", "1", "0", "1.5", "x", str(2**53), "1.152921504606847e+18", "1e+20",
    ]  # numbers are float64: integers beyond 2**53 keep their float form  # fmt: skip
    assert [category_of(v) for v in (None, "", math.nan, math.inf, [1], {"a": 1})] == [None] * 6
    rows: list[dict[str, Any]] = [
        {"flag": True},
        {"flag": False},
        {"flag": True},
        {"mixed": 1},
        {"mixed": 1.0},
        {"mixed": "x"},
    ]
    profile = build_profile(rows)
    flag, mixed = profile.features
    assert flag.kind == "categorical" and flag.categories == ["true", "false"] and flag.binary
    # numeric until "x" came: the numbers seen before became labels too
    assert mixed.kind == "categorical" and mixed.categories == ["1", "x"] and mixed.counts == [2, 1, 0]
    assert mixed.bin_of(1) == mixed.bin_of(1.0) == mixed.bin_of("1") == 0
    assert flag.bin_of(True) == 0 and flag.bin_of("false") == 1


def test_forced_categorical() -> None:
    rows = [{"zip": z} for z in [75001, 75001, 69001, 13001]]
    f = build_profile(rows, categorical=["zip"]).get("zip")
    assert f is not None and f.kind == "categorical"
    assert f.categories == ["75001", "13001", "69001"] and f.counts == [2, 1, 1, 0]
    assert f.sample and all(isinstance(v, str) for v in f.sample)


def test_the_other_label_itself_is_never_a_category() -> None:
    f = build_profile([{"c": OTHER_BIN}] * 5 + [{"c": "a"}]).get("c")
    assert f is not None and f.categories == ["a"] and f.counts == [1, 5]
    assert f.bins() == ["a", OTHER_BIN]


# -- sample, columns, predictions -----------------------------------------------------------------


def test_reservoir_sample_is_seeded_and_bounded() -> None:
    rows = _rows(3000)
    a = build_profile(rows, sample_size=100)
    b = build_profile(rows, sample_size=100)
    c = build_profile(rows, sample_size=100, seed=1)
    age_a, age_b, age_c = (p.get("age") for p in (a, b, c))
    assert age_a is not None and age_b is not None and age_c is not None
    assert len(age_a.sample) == 100 and age_a.sample == age_b.sample != age_c.sample
    assert set(age_a.sample) <= {r["age"] for r in rows}
    city = a.get("city")
    assert city is not None and len(city.sample) == 100 and set(city.sample) <= {"paris", "lyon", "nice", "lille"}
    small = build_profile(rows[:10], sample_size=100).get("age")
    assert small is not None and small.sample == [r["age"] for r in rows[:10]]  # fewer values: all of them
    assert build_profile(rows, sample_size=0).features[0].sample == []
    # the sample is roughly uniform over the stream, not its first values
    big = build_profile([{"i": float(i)} for i in range(10_000)], sample_size=500).features[0]
    assert 3500 < sum(float(v) for v in big.sample) / 500 < 6500
    # the same rows give the same profile but for the time it was made
    a.created = b.created = ""
    assert a == b


def test_columns_select_and_order_predictions_apart() -> None:
    rows = [{"a": 1, "b": "x", "c": 2.5, "p": 0.9, "q": "yes"}, {"a": 2, "b": "y", "c": 1.5, "p": 0.1, "q": "no"}]
    profile = build_profile(rows, columns=["c", "a"], predictions=["q", "p"])
    assert profile.columns() == ["c", "a"]
    assert [p.name for p in profile.predictions] == ["q", "p"]
    assert profile.get("b") is None
    q = profile.get("q")
    assert q is not None and q.kind == "categorical"
    everything = build_profile(rows, predictions=["p"])
    assert everything.columns() == ["a", "b", "c", "q"] and [p.name for p in everything.predictions] == ["p"]
    assert everything.rows == 2


def test_columns_appearing_late_count_earlier_rows_as_missing() -> None:
    profile = build_profile([{"a": 1}, {"a": 2}, {"a": 3, "late": "x"}])
    late = profile.get("late")
    assert profile.columns() == ["a", "late"]
    assert late is not None and late.count == 1 and late.missing == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"columns": ["a", "nope"]}, "selected column 'nope' is in no row (the rows have: a, b)"),
        ({"predictions": ["nope"]}, "prediction column 'nope' is in no row"),
        ({"categorical": ["nope"]}, "categorical column 'nope' is in no row"),
        ({"columns": ["a"], "categorical": ["b"]}, "categorical column 'b' is not one of the selected columns"),
        ({"columns": ["a", "b"], "predictions": ["b"]}, "column 'b' is both a feature and a prediction column"),
        ({"columns": ["a", "a"]}, "column 'a' is selected twice"),
    ],
)
def test_bad_column_choices_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError) as err:
        build_profile([{"a": 1, "b": "x"}], source="train.csv", **kwargs)
    assert str(err.value).startswith("train.csv: ")
    assert message in str(err.value)


def test_no_rows_is_an_error() -> None:
    with pytest.raises(ProfileError, match=r"^empty\.csv: no rows to profile$"):
        build_profile([], source="empty.csv")


@pytest.mark.parametrize("kwargs", [{"bins": 0}, {"top_k": 0}, {"sample_size": -1}])
def test_bad_parameters(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_profile([{"a": 1}], **kwargs)


# -- the file ------------------------------------------------------------------------------------


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    profile = build_profile(_rows(), predictions=["label"], source="train.csv")
    path = tmp_path / "profile.json"
    path.write_bytes(profile.to_json())
    loaded = load_profile(str(path))
    assert loaded == profile
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT == "infermon-profile" and doc["version"] == VERSION == 1
    assert doc["rows"] == 2000 and doc["source"] == "train.csv"
    assert doc["created"].endswith("Z") and "T" in doc["created"]
    assert [f["name"] for f in doc["features"]] == ["age", "city", "kids", "score"]
    assert [f["name"] for f in doc["predictions"]] == ["label"]
    assert set(doc["features"][0]) == {
        "name", "kind", "count", "missing", "distinct", "mean", "std", "min", "max",
        "edges", "categories", "counts", "sample",
    }  # fmt: skip
    # one line per feature: a diff shows which feature changed
    assert len(path.read_text().splitlines()) == 1 + 5 + (1 + 4 + 1) + (1 + 1 + 1) + 1
    # the loaded profile bins exactly as the built one
    age = loaded.get("age")
    assert age is not None and age.bin_of(40.0) == profile.features[0].bin_of(40.0)
    assert loaded.get("city") is not None and loaded.get("label") is not None


def test_empty_groups_round_trip() -> None:
    profile = Profile([], [], rows=3, source="", created="2024-01-01T00:00:00Z")
    assert Profile.from_json(profile.to_json(), "p.json") == profile
    assert json.loads(profile.to_json())["predictions"] == []


def test_to_json_refuses_non_finite() -> None:
    f = FeatureProfile("x", "numeric", 1, 0, 1, mean=math.nan, std=0.0, min=0.0, max=0.0, counts=[1])
    with pytest.raises(ValueError, match="NaN or infinity"):
        Profile([f], rows=1).to_json()


def _doc() -> dict[str, Any]:
    profile = build_profile([{"x": float(i % 20), "c": "ab"[i % 2]} for i in range(100)], bins=4, sample_size=3)
    doc: dict[str, Any] = json.loads(profile.to_json())
    return doc


def _load(tmp_path: Path, doc: Any) -> str:
    path = tmp_path / "bad.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ProfileError) as err:
        load_profile(str(path))
    message = str(err.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def _set(doc: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    *parents, last = dotted.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("format", "something-else"), "not an infermon profile (format is 'something-else'"),
        (("format", _DELETE), "not an infermon profile (format is None"),
        (("version", 2), "profile version 2 is newer than this infermon reads (version 1) (upgrade infermon"),
        (("version", "1"), "version must be a whole number from 1, not '1'"),
        (("rows", _DELETE), "key 'rows' is missing"),
        (("features", _DELETE), "key 'features' is missing"),
        (("features", {}), "features must be a list"),
        (("features.0.counts", _DELETE), "features[0] ('x').counts: key is missing"),
        (("features.0.edges", _DELETE), "features[0] ('x').edges: key is missing"),
        (("features.1.categories", _DELETE), "features[1] ('c').categories: key is missing"),
        (("features.0.kind", "ordinal"), "features[0] ('x').kind: must be 'numeric' or 'categorical'"),
        (("features.0.name", ""), "features[0]: name must be a non-empty string"),
        (("features.1.name", "x"), "features[1]: name 'x' appears twice"),
        (("features.0.edges", [5.0, 5.0, 10.0]), "features[0] ('x').edges: not strictly increasing at index 1"),
        (("features.0.edges", [1.0, "2"]), "features[0] ('x').edges: must be a list of finite numbers"),
        (("features.0.counts", [100]), "features[0] ('x').counts: 1 counts for 4 bins (3 edges make 4 bins)"),
        (("features.1.counts", [50, 50]), "features[1] ('c').counts: 2 counts for 3 bins (2 categories make 3 bins)"),
        (("features.0.counts", [25, 25, 25, 24]), "features[0] ('x').counts: they add up to 99, not to count (100)"),
        (("features.0.counts", [25, 25, 25, -1]), "features[0] ('x').counts: must be a list of whole numbers >= 0"),
        (("features.0.count", True), "features[0] ('x').count: must be a whole number >= 0, not True"),
        (("features.0.missing", 5), "features[0] ('x').count + missing is 105, more than rows (100)"),
        (("features.0.mean", "1"), "features[0] ('x').mean: must be a finite number or null, not '1'"),
        (("features.1.mean", 1.0), "features[1] ('c').mean: must be null, not 1.0"),
        (("features.1.categories", ["a", "a"]), "features[1] ('c').categories: a value appears twice"),
        (("features.1.categories", ["a", OTHER_BIN]), f"'{OTHER_BIN}' is the name of the bin of other values"),
        (("features.0.sample", ["a"]), "features[0] ('x').sample: must be a list of finite numbers"),
        (("features.1.sample", [1]), "features[1] ('c').sample: must be a list of strings"),
        (("predictions", [1]), "predictions[0]: must be an object, not int"),
    ],
)
def test_load_errors_name_the_file_and_the_problem(tmp_path: Path, change: tuple[str, Any], message: str) -> None:
    got = _load(tmp_path, _set(_doc(), *change))
    assert message in got
    if "newer" not in message:
        assert "infermon baseline build DATA --out profile.json" in got  # and the fix


def test_load_errors_for_files(tmp_path: Path) -> None:
    assert "not valid JSON" in _load(tmp_path, "{nope")
    assert "NaN" not in _doc().__repr__()
    assert "not valid JSON" in _load(tmp_path, json.dumps(_doc()).replace('"mean": 9.5', '"mean": NaN'))
    assert "not an infermon profile (a JSON list, not an object)" in _load(tmp_path, "[]")
    with pytest.raises(ProfileError, match=r"^cannot read profile .*missing\.json: No such file or directory"):
        load_profile(str(tmp_path / "missing.json"))


def test_hand_written_profile_with_optional_keys_left_out(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(
        json.dumps(
            {
                "format": FORMAT,
                "version": 1,
                "rows": 4,
                "features": [
                    {"name": "x", "kind": "numeric", "count": 4, "missing": 0, "distinct": 4,
                     "edges": [1.5], "counts": [2, 2]},
                    {"name": "c", "kind": "categorical", "count": 4, "missing": 0, "distinct": 2,
                     "categories": ["a"], "counts": [3, 1]},
                ],
            }
        )
    )  # fmt: skip
    profile = load_profile(str(path))
    assert profile.predictions == [] and profile.source == "" and profile.columns() == ["x", "c"]
    x, c = profile.features
    assert x.bin_of(1) == 0 and x.bin_of(2) == 1 and x.sample == [] and x.mean is None
    assert c.bin_of("a") == 0 and c.bin_of("b") == 1 and c.proportions() == [0.75, 0.25]


def test_counts_match_a_counter_on_a_skewed_categorical() -> None:
    r = random.Random(7)
    values = [f"c{int(r.paretovariate(1.2))}" for _ in range(5000)]
    f = build_profile([{"v": v} for v in values], top_k=20).get("v")
    assert f is not None
    top = sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    assert f.categories == [k for k, _ in top]
    assert f.counts[:-1] == [c for _, c in top] and f.counts[-1] == 5000 - sum(c for _, c in top)
