"""Bad input: one line naming the field or file, exit code 2, no traceback, nothing overwritten."""
import pytest

from .conftest import TINY, fails_one_line as _fails, fedmoe


def test_missing_config(capsys, tmp_path):
    _fails(capsys, ["run", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "r"], "nope.yaml")


def test_malformed_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: {rounds: 3\n")
    _fails(capsys, ["run", "--config", bad, "--out", tmp_path / "r"], "bad.yaml: malformed YAML")


@pytest.mark.parametrize("override, needle", [
    ("federation.rounds=-2", "federation.rounds"),
    ("train.speed=3", "train.speed: unknown key"),
    ("train.batch_size=big", "train.batch_size"),
    ("algorithm.name=magic", "algorithm.name"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage: must be 0, 1, 2 or 3"),
])
def test_bad_fields(capsys, tmp_path, override, needle):
    _fails(capsys, ["run", "--config", TINY, "--set", override, "--out", tmp_path / "r"], needle)
    assert not (tmp_path / "r").exists()


def test_top_k_above_expert_count(capsys, tmp_path):
    _fails(capsys, ["run", "--config", TINY, "--set", "tiers.1.top_k=500", "--out", tmp_path / "r"],
           "tiers.1.top_k: 500 exceeds")


def test_missing_data_file(capsys, tmp_path):
    _fails(capsys, ["run", "--config", TINY, "--set", "data.source=commonsense",
                    "--set", f"data.path={tmp_path}/absent.json", "--out", tmp_path / "r"], "absent.json")


def test_missing_model_dir(capsys, tmp_path):
    _fails(capsys, ["run", "--config", TINY, "--set", f"model.source={tmp_path}/no-model",
                    "--out", tmp_path / "r"], "model.source")


def test_resume_on_a_directory_that_is_not_a_run(capsys, tmp_path):
    _fails(capsys, ["resume", tmp_path], "not a fedmoe run")
    _fails(capsys, ["resume", tmp_path / "absent"], "no such run directory")
    _fails(capsys, ["eval", tmp_path], "not a fedmoe run")


def test_run_refuses_non_empty_out_dir(capsys, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    _fails(capsys, ["run", "--config", TINY, "--out", out], "not empty")
    _fails(capsys, ["run", "--config", TINY, "--out", out, "--overwrite"], "not a fedmoe run")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    proc = fedmoe("run", "--config", TINY, "--set", "federation.rounds=0", "--out", tmp_path / "r",
                  check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fedmoe: error: federation.rounds: must be >= 1, got 0"
