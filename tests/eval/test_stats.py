"""t quantiles, intervals over seeds and the paired difference of `fedmoe compare`, against
closed forms and direct computation."""
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.eval import compare
from pipeline.eval.stats import binomial_se, mean_interval, paired_interval, t_cdf, t_quantile

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.3])
def test_t_quantile_closed_forms(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    alpha = 4 * p * (1 - p)  # df = 4 (Shaw 2006)
    q = math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha)
    assert t_quantile(p, 4) == pytest.approx(math.copysign(2 * math.sqrt(q - 1), p - 0.5), rel=1e-9)


@pytest.mark.parametrize("df, want", [(3, 3.18244630528371), (9, 2.26215716279821), (29, 2.04522964213270)])
def test_t_quantile_table_values(df, want):
    # 0.975 quantiles, computed to 30 digits by integrating the t density (mpmath).
    assert t_quantile(0.975, df) == pytest.approx(want, rel=1e-11)
    assert t_cdf(want, df) == pytest.approx(0.975, abs=1e-12)


def test_t_quantile_approaches_the_normal_and_rejects_bad_input():
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959963984540054, rel=1e-5)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_mean_interval_against_direct_computation():
    values = [0.52, 0.55, 0.51, 0.58]
    iv = mean_interval(values)
    half = 3.18244630528371 * np.std(values, ddof=1) / math.sqrt(4)
    assert iv.mean == pytest.approx(np.mean(values)) and iv.half == pytest.approx(half, rel=1e-10)
    assert (iv.low, iv.high) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    single = mean_interval([0.5])
    assert single.mean == 0.5 and math.isnan(single.half) and not single.excludes_zero


def test_paired_difference_against_direct_computation():
    method, reference = [0.61, 0.55, 0.70], [0.58, 0.54, 0.66]
    diffs = np.subtract(method, reference)
    iv = paired_interval(method, reference)
    assert iv.mean == pytest.approx(diffs.mean())
    assert iv.half == pytest.approx(4.302652729749464 * diffs.std(ddof=1) / math.sqrt(3), rel=1e-10)
    assert iv.excludes_zero == (abs(diffs.mean()) > iv.half)
    with pytest.raises(ValueError):
        paired_interval([0.1, 0.2], [0.1])


def test_binomial_standard_error_and_the_2500_prompt_rule():
    assert binomial_se(0.5, 2500) == pytest.approx(0.01)
    assert binomial_se(0.5, 8 * 313) <= 0.01 < binomial_se(0.5, 8 * 312)


# -- the compare table, on made-up runs -------------------------------------------------------

FEDIT = [0.50, 0.60, 0.70]  # a wide seed spread: the unpaired intervals overlap
FINALS = {"fedit": FEDIT,
          "better": [f + d for f, d in zip(FEDIT, (0.05, 0.06, 0.055))],  # consistently ahead
          "same": [f + d for f, d in zip(FEDIT, (0.02, -0.03, 0.01))]}


@pytest.fixture
def made_up(monkeypatch):
    def summary(run):
        method, seed = run.name.rsplit("-", 1)
        acc = FINALS[method][int(seed)]
        return {"chance": 0.25, "tiers": {t: {"final": acc - off, "base": 0.3, "top_k": k, "lora_rank": 8}
                                          for t, k, off in (("t1", 2, 0.01), ("t2", 8, 0.0))}}

    monkeypatch.setattr(compare, "load_summary", summary)
    monkeypatch.setattr(compare, "_last_eval_stats", lambda run: {})
    spec = compare.Spec(Path("base.yaml"), [0, 1, 2], [], {m: [] for m in FINALS}, "fedit")
    runs = {(m, s): Path(f"{m}-{s}") for m in FINALS for s in spec.seeds}
    return spec, compare.summarise(spec, runs)


def test_summary_holds_intervals_and_paired_differences(made_up):
    spec, result = made_up
    for method, values in FINALS.items():
        t2 = result[method]["ci95"]["t2"]
        assert t2["mean"] == pytest.approx(np.mean(values))
        assert t2["half"] == pytest.approx(4.302652729749464 * np.std(values, ddof=1) / math.sqrt(3), rel=1e-9)
        diffs = np.subtract(values, FEDIT)
        paired = result[method]["paired"]["t1"]
        assert paired["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
        assert paired["half"] == pytest.approx(4.302652729749464 * diffs.std(ddof=1) / math.sqrt(3), rel=1e-9)
        assert result[method]["accuracy"]["t2"] == pytest.approx((np.mean(values), np.std(values, ddof=1)))
    better = result["better"]
    # Unpaired, "better" and fedit overlap; paired by seed, the difference excludes zero.
    assert better["ci95"]["t2"]["low"] < result["fedit"]["ci95"]["t2"]["high"]
    assert better["paired"]["t2"]["excludes_zero"] and better["paired"]["average"]["excludes_zero"]
    assert not result["same"]["paired"]["t2"]["excludes_zero"]
    assert result["fedit"]["paired"]["t2"]["mean"] == 0.0


def test_markdown_marks_differences_that_exclude_zero(made_up):
    spec, result = made_up
    text = compare.markdown(spec, result, "fedmoe compare x")
    iv = result["better"]["ci95"]["t1"]
    assert f"| better | {100 * iv['mean']:.1f} ± {100 * iv['half']:.1f} |" in text
    d = result["better"]["paired"]["t1"]
    assert f"| better | **{100 * d['mean']:+.1f} ± {100 * d['half']:.1f}** |" in text
    same = [line for line in text.splitlines() if line.startswith("| same | ")]
    assert len(same) == 2 and "**" not in same[1]  # accuracy row, difference row
    assert "| fedit | " in text and text.count("| fedit | ") == 1  # no difference row for the reference


def test_contrasts_are_paired_differences_between_two_named_methods(made_up):
    spec, _ = made_up
    spec = compare.Spec(spec.base, spec.seeds, [], spec.methods, "fedit", [("better", "same")])
    runs = {(m, s): Path(f"{m}-{s}") for m in FINALS for s in spec.seeds}
    result = compare.summarise(spec, runs)
    diffs = np.subtract(FINALS["better"], FINALS["same"])
    iv = result["better"]["contrasts"]["same"]["t2"]
    assert iv["mean"] == pytest.approx(diffs.mean(), abs=1e-12)
    assert iv["half"] == pytest.approx(4.302652729749464 * diffs.std(ddof=1) / math.sqrt(3), rel=1e-9)
    text = compare.markdown(spec, result, "fedmoe compare x")
    row = [line for line in text.splitlines() if line.startswith("| better - same | ")]
    assert row == [f"| better - same | {compare._diff(result['better']['contrasts']['same']['t1'])} | "
                   f"{compare._diff(iv)} | {compare._diff(result['better']['contrasts']['same']['average'])} |"]


@pytest.mark.parametrize("key, methods, match", [
    ("reference: fedit", "smoe", "reference: 'fedit' is not one of the methods"),
    ("convergence_reference: fedit", "smoe", "convergence_reference: 'fedit' is not one of the methods"),
    ("convergence_reference: [smoe, fedit]", "smoe", "convergence_reference: 'fedit' is not one of the methods"),
    ("contrasts: ['smoe - smoe']", "smoe, ubsmoe", "contrasts: 'smoe - smoe'"),
    ("contrasts: ['smoe - fedit']", "smoe, ubsmoe", "contrasts: 'smoe - fedit'"),
    ("contrasts: ['smoe-ubsmoe']", "smoe, ubsmoe", "contrasts: 'smoe-ubsmoe'"),
    ("contrasts: 'smoe - x'", "smoe, ubsmoe", "contrasts: a list")])
def test_a_spec_naming_an_unknown_or_bad_method_is_a_user_error(tmp_path, key, methods, match):
    spec = tmp_path / "spec.yaml"
    listed = ", ".join(f"{m}: ['algorithm.name={m}']" for m in methods.split(", "))
    spec.write_text(f"base: {REPO / 'tests/fixtures/tiny_run.yaml'}\n{key}\nmethods: {{{listed}}}\n")
    with pytest.raises(UserError, match=match):
        compare.read_spec(spec)
