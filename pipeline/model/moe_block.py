"""HeteroMoEBlock: OLMoE's sparse MoE block with a per-call top-k, dropless routed-only dispatch
and per-expert LoRA.

It takes over the Hugging Face block's `gate` (router, `weight [E, H]`) and `experts` (fused
`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, `act_fn`) submodules unchanged, so parameter
names and weights stay those of the checkpoint. Only routed (token, expert) pairs are computed:
pairs are sorted by expert and every projection is one grouped matmul over the jagged groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Expert-LoRA parameter names on the block: (name, factor, projection).
EXPERT_LORA_NAMES = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")


@dataclass
class Routing:
    """One forward's routing, kept only when `HeteroMoEBlock.record_routing` is set."""
    indices: Tensor  # [N, k] experts chosen per token (detached)
    probs: Tensor    # [N, E] router probabilities (detached, fp32)


def _strides_aligned(t: Tensor) -> bool:
    # The CPU grouped_mm kernel wants 16-byte aligned data and every non-unit stride a multiple
    # of 16 bytes (torch 2.13); memmapped or odd-sized tensors take the loop instead.
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride() if s != 1)


def _can_use_grouped_mm(x: Tensor, weight: Tensor) -> bool:
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cuda":
        # The CUDA kernel is bf16-only (torch 2.13 docs); other dtypes take the loop.
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return _strides_aligned(x) and _strides_aligned(weight)


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
    """Rows `offsets[e-1]:offsets[e]` of `x` times `weight[e].T`, for `weight [E, out, in]`.

    `torch.nn.functional.grouped_mm` is the kernel Hugging Face's default `grouped_mm` experts
    path uses; it runs each group as one GEMM and its backward skips the frozen weight's
    gradient. The per-expert loop is the fallback where that kernel is missing or unsupported.
    """
    if _can_use_grouped_mm(x, weight):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    bounds = [0] + offsets.tolist()
    parts = [x[bounds[e]:bounds[e + 1]] @ weight[e].T for e in range(weight.shape[0])]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


def _in_backward() -> bool:
    # Activation checkpointing re-runs forward inside backward; counting again would double
    # the routed-token counts.
    return torch._C._current_graph_task_id() != -1


class HeteroMoEBlock(nn.Module):
    """Drop-in replacement for `OlmoeSparseMoeBlock`: `forward(hidden [B, S, H]) -> [B, S, H]`.

    Attributes read on every call: `top_k` (experts per token), `active_rank` (LoRA rank in use,
    scale `lora_alpha / active_rank`), `record_counts`, `record_routing`.
    """

    def __init__(self, moe_block: nn.Module, lora_rank: int = 8, lora_alpha: float = 16.0,
                 expert_lora: bool = True):
        super().__init__()
        self.gate = moe_block.gate
        self.experts = moe_block.experts
        self.num_experts = self.gate.num_experts
        self.hidden_dim = self.gate.hidden_dim
        self.intermediate_dim = self.experts.intermediate_dim
        self.norm_topk_prob = bool(self.gate.norm_topk_prob)
        self.top_k = int(self.gate.top_k)

        self.lora_alpha = float(lora_alpha)
        self.rank = int(lora_rank) if expert_lora else 0
        self.active_rank = self.rank
        if self.rank:
            E, H, I, r = self.num_experts, self.hidden_dim, self.intermediate_dim, self.rank
            dtype = self.experts.gate_up_proj.dtype
            device = self.experts.gate_up_proj.device
            shapes = {"lora_gate_up_A": (E, r, H), "lora_gate_up_B": (E, 2 * I, r),
                      "lora_down_A": (E, r, I), "lora_down_B": (E, H, r)}
            for name, shape in shapes.items():
                setattr(self, name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))
            self.reset_lora_parameters()

        # int64 so that DeepSpeed's `.half()` / `.bfloat16()` casts leave exact counts alone.
        self.register_buffer("token_counts", torch.zeros(self.num_experts, dtype=torch.long,
                                                         device=self.gate.weight.device),
                             persistent=False)
        self.record_counts = True
        self.record_routing = False
        self.last_routing: Routing | None = None

    # ------------------------------------------------------------------ LoRA
    @property
    def has_lora(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.active_rank

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """peft's init per expert: A ~ kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), B = 0."""
        for name in ("lora_gate_up_A", "lora_down_A"):
            a = getattr(self, name)
            bound = 1.0 / math.sqrt(a.shape[-1])
            a.copy_(torch.rand(a.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)
        self.lora_gate_up_B.zero_()
        self.lora_down_B.zero_()

    def _lora_factors(self, proj: str) -> tuple[Tensor, Tensor]:
        """A [E, r, in], B [E, out, r] at the active rank (views)."""
        r = self.active_rank
        return getattr(self, f"lora_{proj}_A")[:, :r], getattr(self, f"lora_{proj}_B")[..., :r]

    def _kernel_factors(self, proj: str) -> tuple[Tensor, Tensor]:
        """The factors laid out for grouped_mm: its 16-byte stride rule also binds the [S, r]
        intermediate, so unaligned ranks get zero padding (exact, and a copy of E*r*(in+out)).
        """
        a, b = self._lora_factors(proj)
        align = max(1, 16 // a.element_size())
        pad = (-a.shape[1]) % align
        if pad or b.stride(1) % align:
            a = F.pad(a, (0, 0, 0, pad))
            b = F.pad(b, (0, pad)).contiguous()
        return a, b

    def expert_delta(self, proj: str) -> Tensor:
        """s * B_e @ A_e for every expert, [E, out, in]: for merging only, never in forward."""
        a, b = self._lora_factors(proj)
        return self.scale * torch.bmm(b, a)

    # ------------------------------------------------------------------ routing
    def router_logits(self, x: Tensor) -> Tensor:
        # Through the HF router module so that `output_router_logits` (the aux loss) still
        # records them; its own top-k on the side costs N*E, nothing next to the experts.
        return self.gate(x)[0]

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """OLMoE routing: fp32 softmax over the router logits, top-k, the chosen probabilities
        as weights (renormalised only with `norm_topk_prob`).

        Returns indices [N, k], weights [N, k] (in x's dtype), probs [N, E] (fp32). Variants
        (selection-only bias, modulation) override this and leave dispatch alone.
        """
        logits = self.router_logits(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return indices, weights.to(logits.dtype), probs

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_dim)
        indices, weights, probs = self.route(x)
        if self.record_routing:
            self.last_routing = Routing(indices.detach(), probs.detach())
        return self.dispatch(x, indices, weights).reshape(shape)

    def _project(self, xs: Tensor, proj: str, offsets: Tensor) -> Tensor:
        """W_e x (+ s * B_e A_e x) for the rows of each expert e."""
        y = grouped_linear(xs, getattr(self.experts, f"{proj}_proj"), offsets)
        if self.has_lora:
            a, b = self._kernel_factors(proj)
            # Scaling the rank-r intermediate is r/out times cheaper than scaling the output.
            y = y.add_(grouped_linear(grouped_linear(xs, a, offsets) * self.scale, b, offsets))
        return y

    def dispatch(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """Dropless expert computation on the routed (token, expert) pairs only."""
        n_tokens, k = indices.shape
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, deterministic
        counts = torch.bincount(flat, minlength=self.num_experts)
        if self.record_counts and not _in_backward():
            self.token_counts += counts
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        token = order // k

        xs = x[token]
        gate, up = self._project(xs, "gate_up", offsets).chunk(2, dim=-1)
        # The routing weight goes on the I-wide activation rather than the H-wide output:
        # linear, so the same result, and I <= H in OLMoE.
        h = self.experts.act_fn(gate) * up * weights.reshape(-1)[order, None].to(up.dtype)
        y = self._project(h, "down", offsets)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}, "
                f"active_rank={self.active_rank}, lora_alpha={self.lora_alpha}")
