"""The async loop over a schedule with a stand-in client (no model): each client trains from the
version it was dispatched with, FedBuff's result equals a direct replay of the schedule, and a
loop resumed from a block's checkpoint state ends bitwise as the uninterrupted one."""
import math
from types import SimpleNamespace

import torch

from pipeline.algorithms import ClientUpdate, ModelInfo, build_strategy
from pipeline.config import Tier
from pipeline.federation import async_rounds, clock, rounds
from pipeline.federation.clock import Aggregation, Arrival, Boundary, Dispatch

R = 2
INFO = ModelInfo(num_layers=1, num_experts=2, k_max=2, lora_rank=R, lora_alpha=4.0)
TIER = Tier(0, "t", 1.0, 2, 2, 1.0)
KEYS = {"m.q_proj.lora_A": (R, 3), "m.q_proj.lora_B": (3, R)}
COSTS = [1.0, 1.5, 2.5, 4.0]


class Log:
    def __init__(self):
        self.events = []

    def log(self, event, **fields):
        self.events.append((event, fields))


def fake_fed(strategy):
    cfg = SimpleNamespace(federation=SimpleNamespace(clients=len(COSTS), clients_per_round=2, collective_timeout=0))
    from pipeline.federation.timing import PhaseClock

    return SimpleNamespace(cfg=cfg, strategy=strategy, topology=None, metrics=Log(), sums_layout=[],
                           client_tiers=[TIER] * len(COSTS), tiers=[TIER], clock=PhaseClock())


def progress_of(seq: int, client: int) -> dict:
    g = torch.Generator().manual_seed(100 * seq + client)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in KEYS.items()}


def install_client(monkeypatch, seen):
    def train_client(fed, client, seq, progress):
        base = fed.strategy.global_adapters
        seen[seq] = {k: v.clone() for k, v in base.items()}
        moved = {k: base[k] + v for k, v in progress_of(seq, client).items()}
        return ClientUpdate(client, seq, TIER, 2, R, moved, n_samples=5,
                            expert_token_counts=torch.ones(1, 2), tokens=1)
    monkeypatch.setattr(rounds, "train_client", train_client)


def new_strategy():
    s = build_strategy("fedbuff", {"buffer_size": 2}, INFO, [TIER])
    s.init_state({k: torch.full(v, 0.5) for k, v in KEYS.items()})
    s.version, s.versions = 0, {0: s.global_adapters}
    return s


EVENTS = clock.schedule(COSTS, concurrency=3, total=10, per_round=2, buffer_size=2, t_max=None, seed=3)


def run_loop(loop, events):
    for e in events:
        if not isinstance(e, Boundary):
            loop.step(e)


def test_clients_train_from_their_dispatch_version_and_fedbuff_matches_a_replay(monkeypatch):
    seen = {}
    install_client(monkeypatch, seen)
    strategy = new_strategy()
    loop = async_rounds.AsyncLoop(fake_fed(strategy), None)
    loop.resume_at(clock.position(EVENTS, 0))
    run_loop(loop, EVENTS)
    # the direct replay: versions made one by one from the schedule
    versions = [{k: torch.full(v, 0.5) for k, v in KEYS.items()}]
    dispatched = {e.seq: e for e in EVENTS if isinstance(e, Dispatch)}
    arrived = {e.seq: e for e in EVENTS if isinstance(e, Arrival)}
    for g in (e for e in EVENTS if isinstance(e, Aggregation)):
        x = versions[-1]
        step = {k: sum(progress_of(s, dispatched[s].client)[k].double()
                       / math.sqrt(1 + g.version - 1 - arrived[s].base_version) for s in g.members) / len(g.members)
                for k in x}
        versions.append({k: (x[k].double() + step[k]).float() for k in x})
    for seq, d in dispatched.items():
        assert all(torch.allclose(seen[seq][k], versions[d.version][k], atol=1e-6) for k in KEYS), seq
    assert max(a.base_version for a in arrived.values()) > 0 and strategy.version == len(versions) - 1
    assert all(torch.allclose(strategy.global_adapters[k], versions[-1][k], atol=1e-6) for k in KEYS)
    logged = [f for e, f in loop.fed.metrics.events if e == "aggregate"]
    assert [f["staleness"] for f in logged] == [[g.version - 1 - arrived[s].base_version for s in g.members]
                                                 for g in EVENTS if isinstance(g, Aggregation)]


def test_resuming_from_each_block_ends_bitwise(monkeypatch):
    install_client(monkeypatch, {})
    whole = async_rounds.AsyncLoop(fake_fed(new_strategy()), None)
    whole.resume_at(clock.position(EVENTS, 0))
    run_loop(whole, EVENTS)
    blocks = max(e.round for e in EVENTS if isinstance(e, Boundary))
    stale_saved = False
    for block in range(1, blocks):
        first = async_rounds.AsyncLoop(fake_fed(new_strategy()), None)
        at = clock.position(EVENTS, block)
        first.resume_at(clock.position(EVENTS, 0))
        run_loop(first, EVENTS[:at.next_event])
        saved = first.strategy.state_dict()  # what the checkpoint holds
        stale_saved |= any(k.startswith("versions/") for k in saved["tensors"])
        restored = build_strategy("fedbuff", {"buffer_size": 2}, INFO, [TIER])
        restored.load_state_dict({"tensors": {k: v.clone() for k, v in saved["tensors"].items()},
                                  "meta": saved["meta"]})
        again = async_rounds.AsyncLoop(fake_fed(restored), None)
        again.resume_at(at)
        run_loop(again, EVENTS[at.next_event:])
        assert all(torch.equal(restored.global_adapters[k], whole.strategy.global_adapters[k]) for k in KEYS), block
    assert stale_saved  # some checkpoint held an older version that an in-flight client trains from
