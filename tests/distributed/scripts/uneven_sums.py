"""Test data for the packed cross-group sum: two groups whose key sets and dtype mixes differ
(one key only in group 1), and the direct sum every rank must end with."""
import torch


def group_sums(g: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + g)
    out = {"sum/a": torch.randn(64, 33, generator=gen, dtype=torch.float64),
           "weight": torch.tensor([3.0 + g], dtype=torch.float64),
           "counts": torch.randint(0, 1000, (4, 8), generator=gen)}
    if g == 1:
        out["only/in/group1"] = torch.randn(7, generator=gen).to(torch.float32)
        out["half"] = torch.randn(5, generator=gen).to(torch.bfloat16)
    return out


def check_total(total: dict[str, torch.Tensor]) -> None:
    want = group_sums(0)
    for k, v in group_sums(1).items():
        want[k] = want[k] + v if k in want else v
    assert total.keys() == want.keys(), (sorted(total), sorted(want))
    for k in want:
        assert total[k].dtype == want[k].dtype, k
        torch.testing.assert_close(total[k], want[k], rtol=1e-12, atol=0, msg=k)
