"""The tables `fedmoe plan` prints: client groups, the clients they serve, GPU memory per tier."""
from __future__ import annotations

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.federation.topology import Layout
from pipeline.plan.memory import GIB, TierMemory, check_fits, client_state_bytes, model_shape, plan_memory


def layout_rows(layout: Layout, cfg: Config) -> list[dict]:
    """One row per group: index, tier, world ranks, size, torch rendezvous port."""
    rows = []
    for g in layout.groups:
        port = "auto" if cfg.federation.master_port is None else str(cfg.federation.master_port + g.index)
        ranks = f"{g.ranks[0]}" if g.size == 1 else f"{g.ranks[0]}-{g.ranks[-1]}"
        rows.append({"group": g.index, "tier": g.tier or "all", "ranks": ranks, "size": g.size,
                     "port": port})
    return rows


def layout_tables(cfg: Config, layout: Layout, rounds: int = 3, placed: dict | None = None) -> list:
    """The groups, and which clients each serves in the first rounds (the same draw the run makes;
    `placed`: round -> clients per group under federation.placement, else the tier placement)."""
    from rich.table import Table

    from pipeline.federation.sampling import assign_tiers, sample_clients

    groups = Table(title=f"{layout.world_size} rank(s) -> {len(layout.groups)} client group(s)")
    for column in ("group", "tier", "world ranks", "ranks", "torch port"):
        groups.add_column(column)
    for row in layout_rows(layout, cfg):
        groups.add_row(str(row["group"]), row["tier"], row["ranks"], str(row["size"]), row["port"])
    fed = cfg.federation
    client_tiers = [t.name for t in assign_tiers(fed.clients, cfg.tiers, cfg.seed)]
    served = Table(title=f"clients per group (client:tier), {cfg.federation.placement if placed else 'tier'} placement")
    served.add_column("round")
    for g in layout.groups:
        served.add_column(f"group {g.index}")
    for round_ in range(1, min(rounds, fed.rounds) + 1):
        clients = sample_clients(fed.clients, fed.clients_per_round, cfg.seed, round_)
        per_group = placed[round_] if placed else layout.assign(clients, client_tiers)
        served.add_row(str(round_), *(" ".join(f"{c}:{client_tiers[c]}" for c in cs) or "-"
                                      for cs in per_group))
    return [groups, served]


def memory_table(rows: list[TierMemory], cfg: Config):
    """GiB per GPU; `adapter+opt` = adapters + fp32 master + optimizer state + gradients;
    `w/ ckpt`: the total with activation checkpointing; `ckpt`: whether clients use it."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"estimated peak GiB per GPU: {cfg.model.source}, {cfg.train.precision}, ZeRO "
                        f"{cfg.deepspeed.zero_stage}, batch {cfg.train.batch_size} x {cfg.train.max_length}",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    method = any(r.method for r in rows)
    for column in ("tier", "k", "ranks", "tokens", "frozen", "adapter+opt", *(["method"] if method else []),
                   "activ.", "total", "w/ ckpt", "ckpt", "GPU", "fits"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for r in rows:
        values = (r.frozen, r.adapters + r.optimizer + r.gradients, *([r.method] if method else []),
                  r.activations, r.total, r.total_checkpointed)
        table.add_row(r.tier, str(r.top_k), str(r.ranks), str(r.tokens_per_gpu),
                      *(f"{v / GIB:.2f}" for v in values), "on" if r.checkpointed else "off",
                      f"{r.gpu_memory_gb:g}", "yes" if r.fits else "NO")
    return table


def memory_report(cfg: Config, world_size: int, console) -> list[TierMemory]:
    """`fedmoe plan`: print the table; UserError if a tier cannot fit (after the table). A model
    whose config cannot be read offline gets a note instead: the layout is still valid."""
    try:
        shape = model_shape(cfg.model.source)
    except UserError as exc:
        console.print(f"memory: not estimated: {exc}")
        return []
    rows = plan_memory(cfg, world_size, shape)
    console.print(memory_table(rows, cfg))
    if any(r.method for r in rows):
        console.print("method: the pristine copy of the adapted base weights (ZeRO < 3)"
                      + (" and the fp32 calibration gradient of the same weights"
                         if cfg.algorithm.name == "fedsmoothlora" and cfg.algorithm.options.get("ga", True) else ""))
    state = client_state_bytes(shape, cfg)
    if state:
        console.print(f"per-client state: {state / GIB:.2f} GiB on disk under RUN/client_state "
                      f"({cfg.federation.clients} clients, one fp32 adapter each; none held in memory)")
    check_fits(rows)
    return rows
