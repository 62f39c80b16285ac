"""Packing contributions into per-dtype buffers: the layout every group agrees on."""
import numpy as np
import pytest
import torch

from pipeline.federation.collectives import (Entry, PackedSums, buffer_sizes, local_spec, pack,
                                             union_spec, unpack)
from pipeline.federation.distributed import GroupMetrics


def _group(seed, keys):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"sum/a": (3, 4), "sum/b": (5,), "weight": (1,), "counts": (2, 3), "half": (2, 2)}
    dtypes = {"sum/a": torch.float64, "sum/b": torch.float32, "weight": torch.float64,
              "counts": torch.int64, "half": torch.bfloat16}
    out = {}
    for k in keys:
        if dtypes[k] is torch.int64:
            out[k] = torch.randint(0, 100, shapes[k], generator=gen)
        else:
            out[k] = torch.randn(shapes[k], generator=gen, dtype=torch.float64).to(dtypes[k])
    return out


def test_pack_unpack_round_trip_keeps_values_shapes_and_dtypes():
    sums = _group(0, ["sum/a", "sum/b", "weight", "counts", "half"])
    spec = local_spec(sums)
    assert [e.key for e in spec] == sorted(sums)
    buffers = pack(sums, spec)
    # one contiguous buffer per wire dtype; bf16 travels as float32
    assert sorted(buffers) == sorted({np.dtype(np.float64).str, np.dtype(np.float32).str,
                                      np.dtype(np.int64).str})
    assert buffers[np.dtype(np.float64).str].size == 12 + 1
    assert buffers[np.dtype(np.float32).str].size == 5 + 4
    back = unpack(buffers, spec)
    for k, v in sums.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v), k


def test_summed_buffers_equal_the_direct_sum_with_missing_keys_as_zeros():
    groups = [_group(1, ["sum/a", "weight", "counts"]),
              _group(2, ["sum/a", "sum/b", "weight"]),
              {}]  # a group whose clients all failed
    spec = union_spec([local_spec(g) for g in groups])
    assert [e.key for e in spec] == ["counts", "sum/a", "sum/b", "weight"]
    packed = [pack(g, spec) for g in groups]
    total = {w: sum(p[w] for p in packed) for w in packed[0]}  # what MPI.SUM computes
    got = unpack(total, spec)
    want = {}
    for g in groups:
        for k, v in g.items():
            want[k] = want[k] + v if k in want else v.clone()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype
        torch.testing.assert_close(got[k], want[k], rtol=1e-15, atol=0)


def test_pack_copies_the_tensors_and_unpack_views_the_buffer():
    sums = _group(3, ["sum/a", "half"])
    spec = local_spec(sums)
    buffers = pack(sums, spec)
    sums["sum/a"].zero_()  # the buffer holds its own copy (Allreduce writes into it)
    back = unpack(buffers, spec)
    assert back["sum/a"].abs().sum() > 0
    buffers[np.dtype(np.float64).str][:] = 0  # the result is a view: no second copy
    assert torch.all(back["sum/a"] == 0)
    assert back["half"].dtype == torch.bfloat16 and back["half"].abs().sum() > 0


def test_missing_keys_are_zero_even_in_a_reused_allocation():
    spec = local_spec(_group(5, ["sum/a", "sum/b", "weight"]))
    for _ in range(3):
        got = unpack(pack({"weight": torch.ones(1, dtype=torch.float64)}, spec), spec)
        assert torch.all(got["sum/a"] == 0) and torch.all(got["sum/b"] == 0)
        assert got["weight"].item() == 1.0


def test_conflicting_shapes_and_unsummable_dtypes_are_refused():
    with pytest.raises(ValueError, match="sum/a"):
        union_spec([[Entry("sum/a", (3,), "torch.float64")], [Entry("sum/a", (4,), "torch.float64")]])
    with pytest.raises(TypeError, match="flag"):
        local_spec({"flag": torch.tensor([True])})
    spec = local_spec(_group(4, ["sum/a"]))
    with pytest.raises(KeyError):
        pack({"other": torch.zeros(1, dtype=torch.float64)}, spec)
    with pytest.raises(ValueError, match="shape"):
        pack({"sum/a": torch.zeros(4, 3, dtype=torch.float64)}, spec)
    assert buffer_sizes(spec) == {np.dtype(np.float64).str: 12}


def test_packed_sums_equal_the_direct_sum_and_reuse_their_layout():
    clients = [_group(seed, ["sum/a", "sum/b", "weight", "counts"]) for seed in (6, 7, 8)]
    clients[1]["expert"] = torch.ones(2, dtype=torch.float64)  # kept plain: summed elsewhere
    sums = PackedSums(packed=lambda k: k != "expert")
    for c in clients:
        sums.add(c)
    want = {}
    for c in clients:
        for k, v in c.items():
            want[k] = want[k] + v if k in want else v.clone()
    got = sums.tensors()
    assert got.keys() == want.keys() and "expert" not in sums.packed_tensors()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # the sums live in the buffers the Allreduce sends: no pack copy
    assert sums.buffers[np.dtype(np.float64).str].size == 12 + 1 and [e.key for e in sums.spec] == [
        "counts", "sum/a", "sum/b", "weight"]
    # next round, laid out from the agreed spec: adding the same keys keeps the buffers
    again = PackedSums(sums.spec)
    buffers = again.buffers
    again.add(clients[0])
    assert again.buffers is buffers and torch.equal(again.tensors()["sum/a"], clients[0]["sum/a"])
    # a wider agreed layout (another group's key) keeps the sums and adds zeros
    wider = union_spec([again.spec, local_spec({"half": torch.zeros(2, 2, dtype=torch.bfloat16)})])
    again.lay_out(wider)
    assert torch.equal(again.tensors()["sum/a"], clients[0]["sum/a"])
    assert torch.all(unpack(again.buffers, wider)["half"] == 0)
    with pytest.raises(KeyError):
        again.lay_out(wider[1:])  # drops a key that holds a sum


def test_group_metrics_holds_client_events_for_the_collective():
    class Sink:
        def __init__(self):
            self.events = []

        def log(self, event, **fields):
            self.events.append((event, fields))

    sink = Sink()
    writer, other = GroupMetrics(sink), GroupMetrics(None)
    for m in (writer, other):
        m.log("client", round=1, client=3)
        m.log("reject", round=1, client=1, reason="x")
        m.log("round", round=1)
    assert sink.events == [("round", {"round": 1})]  # per-client events wait; others go straight
    assert [e for e, _ in other.take()] == ["client", "reject"] and other.take() == []
    assert other.offset() == 0
