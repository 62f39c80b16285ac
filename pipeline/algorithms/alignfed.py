"""`alignfed`: asynchronous aggregation that repairs staleness (ALGORITHMS.md section 6).

- Client: task loss + `lam * mean_x ||h_loc(x) - stopgrad(h_snap(x))||^2`, h the mean-pooled
  penultimate features, h_snap those of the version the client was dispatched with.
- Server: aggregate on K buffered arrivals or `t_max` of virtual time; group the buffer by base
  version; fit for each stale version v a map T_v (one r x r matrix per LoRA factor, on its rank
  axis: `M A`, `B M`; identity at start, a few Adam steps) so that the features of
  `theta_v + T_v(Delta_v)` on a calibration batch match those of the current version; weights
  `w_i = softmax(-gamma tau_i - 0.5 log(n_i + 1) - log(||Delta_i|| + eps))`;
  `theta += sum_i w_i T_{v_i}(Delta_i)`. Centering within a version group is off by default.

Every sum is a map-reduce over the buffer (one collective under MPI): per version group the
weighted deltas `e_i Delta_i`, their weights `e_i = exp(logit_i)` and, with centering, the plain
sums; `aggregate` fits the maps on the groups' weighted means, which T's linearity allows.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.algorithms.asynchronous import AsyncStrategy, Buffered, add_to, delta, finite_weight
from pipeline.algorithms.base import ClientPlan, register
from pipeline.algorithms.options import Option
from pipeline.federation.server_ops import counters_kept, decoder_and_prefix, features_with, pooled
from pipeline.model.adapters import _is_lora_a, _leaf


def fairness_logit(staleness: int, uploads: int, norm: float, gamma: float, eps: float) -> float:
    return -gamma * staleness - 0.5 * math.log(uploads + 1) - math.log(norm + eps)


def rank_axis(key: str) -> int | None:
    """The rank axis of a LoRA factor (A: -2, B: -1); None for other adapters (DMR's phi)."""
    if _is_lora_a(key):
        return -2
    return -1 if _leaf(key).startswith("lora_") else None


def apply_map(maps: dict[str, Tensor], update: dict[str, Tensor]) -> dict[str, Tensor]:
    """T(update): `M A` on A factors, `B M` on B factors, the rest unchanged."""
    out = {}
    for key, value in update.items():
        axis, m = rank_axis(key), maps.get(key)
        if m is None or axis is None:
            out[key] = value
        elif axis == -2:
            out[key] = torch.matmul(m.to(value.dtype), value)
        else:
            out[key] = torch.matmul(value, m.to(value.dtype))
    return out


def identity_maps(adapters: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    return {k: torch.eye(rank, dtype=torch.float32) for k in adapters if rank_axis(k) is not None}


@register
class AlignFed(AsyncStrategy):
    name = "alignfed"
    option_spec = {
        "buffer_size": Option(4, int, low=1),  # K
        "t_max": Option(None, float, low=0.0, open_low=True, nullable=True),  # virtual time; None: no timer
        "lam": Option(0.1, float, low=0.0),  # feature-consistency weight of the client loss
        "gamma": Option(0.2, float, low=0.0),  # staleness penalty of the fairness weights
        "eps": Option(1e-8, float, low=0.0, open_low=True),
        "align": Option(True, bool),  # cross-version alignment maps
        "align_steps": Option(5, int, low=0),
        "align_lr": Option(1e-2, float, low=0.0, open_low=True),
        "calibration_size": Option(8, int, low=1),
        "center": Option(False, bool),  # the reference's within-group centering (zeroes single updates)
    }

    def __init__(self, options, model, tiers):
        super().__init__(options, model, tiers)
        self._hooks: list = []
        self._captured: dict = {}

    @property
    def buffer_size(self) -> int:
        return self.options["buffer_size"]

    @property
    def t_max(self) -> float | None:
        return self.options["t_max"]

    # --- client: feature consistency against the dispatched version -------------------------
    def configure_model(self, model: torch.nn.Module, plan: ClientPlan | None) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._captured = [], {}
        if plan is None or self.options["lam"] == 0:
            return
        decoder, _ = decoder_and_prefix(model)

        def inputs(module, args, kwargs):
            self._captured["inputs"] = {k: kwargs[k] for k in ("input_ids", "attention_mask")}

        def hidden(module, args, output):
            self._captured["hidden"] = output

        self._hooks = [model.register_forward_pre_hook(inputs, with_kwargs=True),
                       decoder.norm.register_forward_hook(hidden)]

    def extra_loss(self, model: torch.nn.Module, plan: ClientPlan) -> Tensor | None:
        if self.options["lam"] == 0 or "hidden" not in self._captured:
            return None
        batch = self._captured["inputs"]
        local = pooled(self._captured["hidden"].float(), batch["attention_mask"])
        with torch.no_grad():
            snap = features_with(model, plan.adapters, batch)
        return self.options["lam"] * ((local - snap) ** 2).sum(-1).mean()

    # --- server --------------------------------------------------------------------------
    def arrival_contribution(self, item: Buffered, base):
        d = delta(item.update.adapters, base)
        norm = math.sqrt(sum(float((v * v).sum()) for v in d.values()))
        e = math.exp(fairness_logit(item.staleness, item.uploads, norm, self.options["gamma"], self.options["eps"]))
        v = f"v{item.base_version}"
        out = {f"{v}/w/{k}": t * e for k, t in d.items()}
        out[f"{v}/weight"] = finite_weight(e)
        out[f"tier/{item.update.tier.name}"] = finite_weight(e)  # for the record: each tier's weight share
        if self.options["center"]:
            out.update({f"{v}/n/{k}": t for k, t in d.items()})
            out[f"{v}/count"] = finite_weight(1.0)
        return out

    def aggregate(self, sums, versions, ops) -> dict:
        groups = sorted({int(k.split("/")[0][1:]) for k in sums if k.endswith("/weight")})
        total = sum(sums[f"v{v}/weight"].item() for v in groups)
        step: dict[str, Tensor] = {}
        metrics = {"groups": {}}
        for v in groups:
            weight = sums[f"v{v}/weight"].item()
            part = {k: sums[f"v{v}/w/{k}"] for k in self.global_adapters if f"v{v}/w/{k}" in sums}
            if self.options["center"]:
                count = sums[f"v{v}/count"].item()
                part = {k: t - weight * sums[f"v{v}/n/{k}"] / count for k, t in part.items()}
            stale = v != self.version
            info = {"share": weight / total}
            if stale and self.options["align"] and self.options["align_steps"] > 0:
                mean = {k: (t / weight).float() for k, t in part.items()}
                maps, info["align_loss"] = self.fit_map(versions[v], mean, ops)
                part = apply_map({k: m.double() for k, m in maps.items()}, part)
            for k, t in part.items():
                step[k] = step[k] + t if k in step else t
            metrics["groups"][str(v)] = info
        self.global_adapters = add_to(self.global_adapters, {k: t / total for k, t in step.items()})
        metrics["tier_weight"] = {k[len("tier/"):]: v.item() / total for k, v in sorted(sums.items())
                                  if k.startswith("tier/")}
        return metrics

    def fit_map(self, base: dict[str, Tensor], mean_delta: dict[str, Tensor], ops) -> tuple[dict, list[float]]:
        """T_v by Adam from the identity: features of base + T(mean_delta) towards the current
        version's on the calibration batch. Returns the maps and the loss before and after."""
        o = self.options
        ops.use_full_model()
        batch = ops.calibration_batch(o["calibration_size"])
        with torch.no_grad():
            target = ops.mean_features(self.global_adapters, batch)
        maps = {k: m.requires_grad_(True) for k, m in identity_maps(mean_delta, self.model.lora_rank).items()}
        optimizer = torch.optim.Adam(list(maps.values()), lr=o["align_lr"])
        losses = []
        with torch.enable_grad():
            for _ in range(o["align_steps"] + 1):
                moved = apply_map(maps, mean_delta)
                adapters = {k: base[k].float() + moved[k] if k in moved else base[k] for k in base}
                loss = ((ops.mean_features(adapters, batch) - target) ** 2).sum()
                losses.append(loss.item())
                if len(losses) > o["align_steps"]:
                    break  # the last pass only measures
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return {k: m.detach() for k, m in maps.items()}, [losses[0], losses[-1]]


__all__ = ["AlignFed", "apply_map", "fairness_logit", "identity_maps", "counters_kept"]
