"""The LLM-Adapters evaluation layout (dataset/<name>/test.json) on a fixture tree written here."""
import json
from pathlib import Path

import pytest

from pipeline.config import config_from_dict
from pipeline.data import load_commonsense
from pipeline.data.commonsense import TEST_SETS, load_test_tree
from pipeline.errors import UserError
from pipeline.federation.inputs import load_federated_data

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "commonsense_tiny.json"
# Which fixture records (by index) go into which test set: each record's label kind fits its set.
LAYOUT = {"boolq": [0, 7], "piqa": [1], "social_i_qa": [2], "hellaswag": [3], "winogrande": [4],
          "ARC-Challenge": [5], "ARC-Easy": [6], "openbookqa": [5, 6]}


def write_tree(root: Path, layout=LAYOUT) -> Path:
    records = json.loads(FIXTURE.read_text())
    for name, picks in layout.items():
        (root / name).mkdir(parents=True)
        (root / name / "test.json").write_text(json.dumps([records[i] for i in picks]))
    (root / "gsm8k").mkdir()  # one of their math sets: not a commonsense test set, ignored
    (root / "gsm8k" / "test.json").write_text(json.dumps([{"instruction": "1+1?", "answer": "2"}]))
    return root


def test_tree_loads_the_eight_sets_in_order_with_dataset_families(tmp_path):
    exs = load_test_tree(write_tree(tmp_path / "dataset"))
    want = [name for name in TEST_SETS for _ in LAYOUT[name]]
    assert [e.family for e in exs] == want
    records = json.loads(FIXTURE.read_text())
    golds = [records[i]["answer"] for name in TEST_SETS for i in LAYOUT[name]]
    assert [e.options[e.answer] for e in exs] == golds
    assert exs[0].options == ("true", "false")
    assert len(exs[-1].options) == 5  # openbookqa's second record has five answers
    assert all(e.prompt.endswith("### Response:\nthe correct answer is") for e in exs)
    assert load_commonsense(tmp_path / "dataset") == exs  # a directory in this layout is read the same way


def test_partial_tree_loads_what_is_there(tmp_path):
    exs = load_test_tree(write_tree(tmp_path / "d", {"winogrande": [4]}))
    assert [(e.family, e.options, e.answer) for e in exs] == [("winogrande", ("option1", "option2"), 1)]


def test_tree_without_test_sets_says_what_it_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="boolq, piqa"):
        load_test_tree(tmp_path / "empty")


def test_a_record_its_sets_rule_can_never_extract_is_refused(tmp_path):
    # A PIQA test set holding a SIQA-style record: "answer2" is no piqa label.
    root = write_tree(tmp_path / "dataset", {"piqa": [1, 2]})
    with pytest.raises(ValueError) as err:
        load_test_tree(root)
    assert "piqa" in str(err.value) and "record 1" in str(err.value) and "answer2" in str(err.value)


def test_invalid_json_names_the_file(tmp_path):
    root = write_tree(tmp_path / "dataset", {"boolq": [0]})
    (root / "boolq" / "test.json").write_text("[{")
    with pytest.raises(ValueError, match="boolq/test.json: invalid JSON"):
        load_test_tree(root)


def _commonsense_config(eval_path: Path):
    return config_from_dict({
        "tiers": [{"name": "t", "budget": 1.0}], "federation": {"clients": 2, "clients_per_round": 1},
        "data": {"source": "commonsense", "path": str(FIXTURE), "eval_path": str(eval_path)}})


def test_eval_path_pointing_at_the_tree_evaluates_on_its_test_sets(tmp_path):
    data = load_federated_data(_commonsense_config(write_tree(tmp_path / "dataset")), tokenizer=None)
    assert len(data.train_examples) == 8  # all of data.path: the test sets are separate
    assert sorted({e.family for e in data.eval_examples}) == sorted(TEST_SETS)


def test_bad_tree_is_a_user_error_naming_the_field(tmp_path):
    root = write_tree(tmp_path / "dataset", {"hellaswag": [4]})  # an option-style record
    with pytest.raises(UserError, match="data.eval_path: .*hellaswag"):
        load_federated_data(_commonsense_config(root), tokenizer=None)
