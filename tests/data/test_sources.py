from __future__ import annotations

import json
from pathlib import Path

import pytest

from optitool.data.inputs import InputSource
from optitool.data.sources import load_dataset
from optitool.errors import ConfigError
from optitool.spec import DataSpec
from optitool.testing import tiny_tokenizer


def jsonl(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


from optitool.testing import WORDS  # noqa: E402

ROWS = [{"text": f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]} {i}", "label": ["business", "sport"][i % 2]}
        for i in range(40)]


def test_splits_are_deterministic_disjoint_and_sized(tmp_path):
    spec = DataSpec(source="jsonl", path=str(jsonl(tmp_path, ROWS)), splits={"train": 0.5, "calibration": 4, "eval": 0.25})
    a, b = load_dataset(spec, tmp_path, seed=7), load_dataset(spec, tmp_path, seed=7)
    assert {k: len(v) for k, v in a.splits.items() if v} == {"train": 20, "calibration": 4, "eval": 10}
    assert a.splits == b.splits
    texts = [e.text for split in a.splits.values() for e in split]
    assert len(texts) == len(set(texts))
    assert load_dataset(spec, tmp_path, seed=8).splits != a.splits
    assert a.label_names == ["business", "sport"]


def test_csv_and_folder_sources(tmp_path, optitool_text_folder):
    csv = tmp_path / "d.csv"
    csv.write_text("body,topic\n" + "\n".join(f"text {i},{'ab'[i % 2]}" for i in range(10)))
    spec = DataSpec(source="csv", path=str(csv), text_field="body", label_field="topic", splits={"eval": 1.0 - 1e-9})
    ds = load_dataset(spec, tmp_path, seed=0)
    assert ds.label_names == ["a", "b"] and len(ds.splits["eval"]) == 9
    folder = load_dataset(DataSpec(source="folder", path=str(optitool_text_folder)), tmp_path, seed=0)
    assert folder.label_names == ["business", "sport", "tech"]


def test_python_source(tmp_path):
    (tmp_path / "mydata.py").write_text("def rows():\n    return [{'text': 'a b', 'label': 'x'}] * 10\n")
    ds = load_dataset(DataSpec(source="python", function="mydata:rows", splits={"eval": 0.5}), tmp_path, seed=0)
    assert len(ds.splits["eval"]) == 5


@pytest.mark.parametrize("spec_kwargs, fragment", [
    ({"text_field": "body"}, "column 'body' is not in the data"),
    ({"label_field": "topic"}, "column 'topic' is not in the data"),
    ({"labels": ["business"]}, "label values ['sport'] are not in [data].labels"),
    ({"splits": {"train": 30, "eval": 30}}, "ask for 60 examples but the data has 40"),
])
def test_bad_data_errors(tmp_path, spec_kwargs, fragment):
    spec = DataSpec(source="jsonl", path=str(jsonl(tmp_path, ROWS)), **spec_kwargs)
    with pytest.raises(ConfigError) as err:
        load_dataset(spec, tmp_path, seed=0)
    assert fragment in str(err.value)


def test_empty_split_is_named(tmp_path):
    spec = DataSpec(source="jsonl", path=str(jsonl(tmp_path, ROWS)), splits={"eval": 0.5})
    with pytest.raises(ConfigError, match="the 'train' split is empty"):
        load_dataset(spec, tmp_path, seed=0).split("train")


def test_invalid_json_line_is_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_dataset(DataSpec(source="jsonl", path=str(path)), tmp_path, seed=0)


def test_inputs_from_text_rotate_and_random_inputs_are_seeded(tmp_path):
    ds = load_dataset(DataSpec(source="jsonl", path=str(jsonl(tmp_path, ROWS)), splits={"eval": 0.5}), tmp_path, 0)
    source = InputSource(ds, tokenizer=tiny_tokenizer(), max_length=12, seed=3)
    first, second = source.example(4, 12, index=0), source.example(4, 12, index=1)
    assert first["input_ids"].shape == (4, 12) and not (first["input_ids"] == second["input_ids"]).all()
    assert (source.random(2, 8)["input_ids"] == source.random(2, 8)["input_ids"]).all()
    assert (source.random(2, 8)["input_ids"] != 0).all()
    batch = next(source.batches("eval", 8))
    assert batch.labels.tolist() == [e.label for e in ds.splits["eval"][:8]]
