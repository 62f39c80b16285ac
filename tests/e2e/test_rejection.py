"""A client update with NaN/Inf or a wrong shape is rejected and logged; the global state stays intact."""
import json

import pytest
import torch

from pipeline.config import load_config
from pipeline.federation import assembly, rounds

from .conftest import TINY


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    cfg = load_config(TINY, ["logging.progress=false", "checkpoint.save_merged=false"])
    return assembly.build(cfg, tmp_path_factory.mktemp("reject"), None)


def _poison(monkeypatch, bad_clients, how):
    real = rounds.train_client

    def poisoned(fed_, client, round_, progress):
        update = real(fed_, client, round_, progress)
        if client in bad_clients:
            key = next(iter(update.adapters))
            update.adapters[key] = how(update.adapters[key])
        return update

    monkeypatch.setattr(rounds, "train_client", poisoned)
    return real


@pytest.mark.parametrize("how", [lambda t: torch.full_like(t, float("nan")),
                                 lambda t: t.flatten()[:-1],
                                 lambda t: t * float("inf")])
def test_bad_update_is_rejected_and_the_rest_aggregated(fed, monkeypatch, how):
    round_ = 1
    clients = rounds.sample_clients(fed.cfg.federation.clients, fed.cfg.federation.clients_per_round,
                                    fed.cfg.seed, round_)
    start = {k: v.clone() for k, v in fed.strategy.global_adapters.items()}
    real = _poison(monkeypatch, {clients[0]}, how)
    rounds.run_round(fed, round_, None)
    aggregated = fed.strategy.global_adapters
    # With one accepted client the weighted average is that client's own adapters.
    fed.strategy.global_adapters = start
    expected = real(fed, clients[1], round_, None).adapters
    for k in expected:
        torch.testing.assert_close(aggregated[k], expected[k], rtol=1e-6, atol=1e-7)
    lines = [json.loads(x) for x in (fed.run_dir / "metrics.jsonl").read_text().splitlines()]
    rejects = [e for e in lines if e["event"] == "reject"]
    assert rejects and rejects[-1]["client"] == clients[0]


def test_round_fails_cleanly_when_too_few_clients_report(fed, monkeypatch):
    start = {k: v.clone() for k, v in fed.strategy.global_adapters.items()}
    _poison(monkeypatch, set(range(fed.cfg.federation.clients)), lambda t: t * float("nan"))
    with pytest.raises(rounds.RoundFailed, match="0 of 2 clients reported"):
        rounds.run_round(fed, 1, None)
    for k, v in start.items():
        assert torch.equal(fed.strategy.global_adapters[k], v)
