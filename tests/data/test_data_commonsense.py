"""load_commonsense on a small LLM-Adapters-layout fixture, and its error messages."""

import json
from pathlib import Path

import pytest

from pipeline.data import load_commonsense

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "commonsense_tiny.json"


def test_fixture_loads_with_families_options_and_answers():
    exs = load_commonsense(str(FIXTURE))
    assert [e.family for e in exs] == [
        "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_obqa", "arc_obqa", "boolq"
    ]
    assert exs[0].options == ("true", "false") and exs[0].answer == 0
    assert exs[1].options == ("solution1", "solution2") and exs[1].answer == 0
    assert exs[2].options == ("answer1", "answer2", "answer3") and exs[2].answer == 1
    assert exs[3].options == tuple(f"ending{i}" for i in range(1, 5)) and exs[3].answer == 2
    assert exs[4].options == ("option1", "option2") and exs[4].answer == 1
    assert len(exs[5].options) == 4 and len(exs[6].options) == 5 and exs[6].answer == 4
    assert exs[7].answer == 1
    for e in exs:
        assert e.prompt.endswith("### Response:\nthe correct answer is")
    assert "### Input:\nThe old bridge" in exs[7].prompt  # a record with an input
    assert "### Input:" not in exs[0].prompt


def test_jsonl_and_path_objects_work(tmp_path):
    records = json.loads(FIXTURE.read_text())
    path = tmp_path / "cs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:3]) + "\n")
    exs = load_commonsense(path)
    assert [e.family for e in exs] == ["boolq", "piqa", "siqa"]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "commonsense_15k.json"
    with pytest.raises(FileNotFoundError, match="commonsense_15k.json"):
        load_commonsense(str(missing))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"instruction": "Q?\n\nAnswer format: true/false", "input": "", "output": "x", "answer": "maybe"}, "maybe"),
        ({"input": "", "output": "x", "answer": "true"}, "instruction"),
        ({"instruction": "Q\n\nAnswer format: option1/option2", "input": "", "output": "x", "answer": "option3"}, "option3"),
        ({"instruction": "Q?", "input": "", "output": "x", "answer": 1}, "answer"),
    ],
)
def test_malformed_record_names_file_and_index(tmp_path, bad, message):
    records = json.loads(FIXTURE.read_text())[:3] + [bad]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=message) as err:
        load_commonsense(str(path))
    assert "bad.json" in str(err.value) and "record 3" in str(err.value)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "Q", "answer": "true"},')
    with pytest.raises(ValueError, match="broken.json"):
        load_commonsense(str(path))
