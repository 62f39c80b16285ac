"""`fedmoe compare` on the smoke spec: the table's numbers against the runs' own metrics."""
import json

import numpy as np
import pytest

from .conftest import REPO, fedmoe

pytestmark = pytest.mark.slow


def test_compare_table_matches_the_runs(tmp_path):
    out = tmp_path / "cmp"
    fedmoe("compare", REPO / "configs" / "compare" / "smoke.yaml", "--out", out, "--jobs", "2")
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["smoe", "ubsmoe", "hetlora"]
    table = (out / "compare.md").read_text()
    for method, result in summary.items():
        finals = []
        for seed in (0, 1):
            events = [json.loads(x) for x in (out / f"{method}-seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            last = max(e["round"] for e in events if e["event"] == "eval")
            finals.append({e["tier"]: e["accuracy"] for e in events if e["event"] == "eval" and e["round"] == last})
        for tier in ("low", "high"):
            values = [f[tier] for f in finals]
            assert result["accuracy"][tier][0] == pytest.approx(np.mean(values))
            assert result["accuracy"][tier][1] == pytest.approx(np.std(values, ddof=1))
        assert f"| {method} |" in table
    convergence = table.split("## Convergence")[1]
    assert all(f"| {method} | " in convergence for method in summary)
    assert "| smoe | never" not in convergence  # the reference reaches its own final loss
    for plot in ("accuracy_per_tier", "accuracy_over_rounds", "expert_load", "flops_per_tier"):
        assert (out / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second call reuses the finished runs instead of training again.
    before = (out / "smoe-seed0" / "metrics.jsonl").stat().st_mtime
    fedmoe("compare", REPO / "configs" / "compare" / "smoke.yaml", "--out", out)
    assert (out / "smoe-seed0" / "metrics.jsonl").stat().st_mtime == before


def test_compare_bad_spec(tmp_path, cli):
    bad = tmp_path / "spec.yaml"
    bad.write_text("methods: {a: ['train.lr=-1']}\n")
    code, _, stderr = cli("compare", bad, "--out", tmp_path / "o", check=False)
    assert code == 2 and "train.lr" in stderr and "Traceback" not in stderr
