"""HeteroMoEBlock: OLMoE's sparse MoE block with a per-call top-k, dropless routed-only dispatch
and per-expert LoRA.

It takes over the Hugging Face block's `gate` (router, `weight [E, H]`) and `experts` (fused
`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`, `act_fn`) submodules unchanged, so parameter
names and weights stay those of the checkpoint. Only routed (token, expert) pairs are computed:
pairs are sorted by expert, and each projection runs over the jagged per-expert groups, as
`grouped_mm` (Hugging Face's default experts kernel) or, for expert LoRA on CPU, as one loop of
per-expert GEMMs with a hand-written backward (`_ExpertLoRALinear`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.lora import ScaledLoRA

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
    if x.device.type == "cuda" and not (
            x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)):
        return False  # the CUDA kernel is bf16-only on sm80+ (torch 2.13 docs)
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


class _ExpertLoRALinear(torch.autograd.Function):
    """y = W_e x + s * B_e (A_e x) for the rows of each expert e, with a hand-written backward.

    Autograd through grouped_mm calls gives the same numbers, but the rank-r products are bound
    by memory, not FLOPs, and their layout decides their speed: on CPU, keeping the rank-r
    intermediates as [r, S] (`A_e @ x^T` rather than `x @ A_e^T`) and B as [E, r, out] is
    faster than autograd's choice, and writing in place saves the
    [S, out] LoRA output and the second input gradient that autograd allocates only to add.
    CPU grouped_mm is itself a loop of per-group GEMMs, so the explicit loop over experts
    loses nothing; other devices run the same products as grouped_mm calls.
    Shapes: xs [S, in], weight [E, out, in], a [E, r, in], b [E, out, r], offsets [E] int32.
    """

    @staticmethod
    def forward(ctx, xs, weight, a, b, offsets, scale, cpu_loop):
        ctx.cpu_loop = cpu_loop
        if cpu_loop:
            b_t = b.transpose(-2, -1).contiguous()  # [E, r, out]
            y = xs.new_empty(xs.shape[0], weight.shape[1])
            xa_t = xs.new_empty(a.shape[1], xs.shape[0])  # s * A_e x, as [r, S]
            for e, rows in _groups(offsets):
                torch.mm(xs[rows], weight[e].T, out=y[rows])
                torch.mm(a[e], xs[rows].T, out=xa_t[:, rows]).mul_(scale)
                y[rows].addmm_(xa_t[:, rows].T, b_t[e])
            ctx.save_for_backward(xs, weight, a, b_t, xa_t, offsets)
        else:
            y = F.grouped_mm(xs, weight.transpose(-2, -1), offs=offsets)
            xa = F.grouped_mm(xs, a.transpose(-2, -1), offs=offsets).mul_(scale)
            y.add_(F.grouped_mm(xa, b.transpose(-2, -1), offs=offsets))
            ctx.save_for_backward(xs, weight, a, b, xa, offsets)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.cpu_loop:
            return _ExpertLoRALinear._backward_cpu(ctx, grad, need_x, need_w)
        xs, weight, a, b, xa, offsets = ctx.saved_tensors
        dxs = dweight = None
        dxa = F.grouped_mm(grad, b, offs=offsets).mul_(ctx.scale)  # [S, r]
        if need_x:
            dxs = F.grouped_mm(grad, weight, offs=offsets)
            dxs.add_(F.grouped_mm(dxa, a, offs=offsets))
        if need_w:
            dweight = F.grouped_mm(grad.T, xs, offs=offsets)
        da = F.grouped_mm(dxa.T, xs, offs=offsets)
        db = F.grouped_mm(xa.T, grad, offs=offsets).transpose(-2, -1)
        return dxs, dweight, da, db, None, None, None

    @staticmethod
    def _backward_cpu(ctx, grad, need_x, need_w):
        xs, weight, a, b_t, xa_t, offsets = ctx.saved_tensors
        dxa_t = xs.new_empty(a.shape[1], xs.shape[0])  # s * B_e^T g, as [r, S]
        da = torch.zeros_like(a)
        db_t = torch.zeros_like(b_t)
        dxs = torch.empty_like(xs) if need_x else None
        dweight = torch.zeros_like(weight) if need_w else None
        for e, rows in _groups(offsets):
            g = grad[rows]
            torch.mm(b_t[e], g.T, out=dxa_t[:, rows]).mul_(ctx.scale)
            torch.mm(xa_t[:, rows], g, out=db_t[e])
            torch.mm(dxa_t[:, rows], xs[rows], out=da[e])
            if need_x:
                torch.mm(g, weight[e], out=dxs[rows]).addmm_(dxa_t[:, rows].T, a[e])
            if need_w:
                torch.mm(g.T, xs[rows], out=dweight[e])
        return dxs, dweight, da, db_t.transpose(-2, -1), None, None, None


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[index] along dim 0. Not `x[index]`: on CPU the backward of tensor indexing is an
    index_put_ whose multi-threaded float accumulation order varies from run to run, while
    index_select's backward (index_add_) adds rows in index order: the same bits every run."""
    return x.index_select(0, index)


def _use_cpu_loop(x: Tensor) -> bool:
    return x.device.type == "cpu"


def _groups(offsets: Tensor):
    """(expert, row slice) for every expert with rows."""
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            yield e, slice(start, end)
        start = end


def _in_backward() -> bool:
    # Activation checkpointing re-runs forward inside backward; counting again would double
    # the routed-token counts.
    return torch._C._current_graph_task_id() != -1


class HeteroMoEBlock(ScaledLoRA, nn.Module):
    """Drop-in replacement for `OlmoeSparseMoeBlock`: `forward(hidden [B, S, H]) -> [B, S, H]`.

    Attributes read on every call: `top_k` (experts per token), `active_rank` (LoRA rank in use,
    scale `lora_alpha / active_rank` unless `scale_override` is set), `record_counts`,
    `record_routing`, `token_mask` (which tokens are real; pads are not routed), and
    `projection_observer` (see `_project`).
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
        self.scale_override: float | None = None  # a rank-independent scale (set_lora_scale)
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
        # Routing variants, off by default (set by pipeline.model.routing).
        self.register_parameter("phi", None)
        self.n_candidates: int | None = None
        self.selection_bias: Tensor | None = None
        self.record_counts = True
        self.record_routing = False
        self.last_routing: Routing | None = None
        # [B, T] bool, True on real tokens, set before every model forward from its attention
        # mask (pipeline.model.build); None: every token is real. Kept until the next forward so
        # that a checkpointed layer's recomputation routes the same tokens.
        self.token_mask: Tensor | None = None
        # Called as observer(block, proj, xs, out, offsets) on every projection whose output needs
        # a gradient (UB-SMoE's weight-space pseudo-gradient hooks its backward there); None: off.
        # A plain function, so that a deep copy of the model shares it.
        self.projection_observer = None
        # The experts [start, stop) this block holds in its fused expert tensors: all of them,
        # unless expert parallelism (pipeline/engine/expert_parallel.py) gave this rank a share.
        self.expert_range = (0, self.num_experts)
        # Set by expert parallelism, None otherwise: an object whose `dispatch(xs, w, counts)`
        # takes the routed rows (sorted by expert) to the ranks holding their experts and whose
        # `combine(y, sent)` brings the results back. The block itself holds no process group.
        self.token_exchange = None

    # ------------------------------------------------------------------ LoRA
    @property
    def has_lora(self) -> bool:
        return self.rank > 0

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
        if self.phi is not None:
            # DMR (pipeline.model.routing): shift the top-N_p candidates' affinities by phi.
            candidates = torch.topk(logits, self.n_candidates, dim=-1).indices
            inside = torch.zeros_like(logits).scatter_(1, candidates, 1.0)
            logits = logits + inside * self.phi.to(logits.dtype)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        if self.selection_bias is None:
            weights, indices = torch.topk(probs, self.top_k, dim=-1)
        else:  # loss-free balancing: the bias picks the experts, the gates stay unbiased
            indices = torch.topk(probs + self.selection_bias, self.top_k, dim=-1).indices
            weights = probs.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return indices, weights.to(logits.dtype), probs

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_dim)
        real = self._real_tokens(shape)
        if real is not None:  # pads are not routed: no counts, no statistics, zero MoE output
            x = x.index_select(0, real)
        indices, weights, probs = self.route(x)
        if self.record_routing:
            self.last_routing = Routing(indices.detach(), probs.detach())
        y = self.dispatch(x, indices, weights)
        if real is not None:
            y = y.new_zeros(shape.numel() // self.hidden_dim, self.hidden_dim).index_copy(0, real, y)
        return y.reshape(shape)

    def _real_tokens(self, shape) -> Tensor | None:
        """Flat indices of the real tokens of a [B, S, H] input, None when all are real. The mask
        covers the whole sequence; an input of S tokens is its last S (decoding with a cache)."""
        mask = self.token_mask
        if mask is None or len(shape) != 3:
            return None
        if mask.shape[0] != shape[0] or mask.shape[1] < shape[1]:
            raise ValueError(f"token mask {tuple(mask.shape)} does not cover hidden states {tuple(shape)}")
        mask = mask[:, mask.shape[1] - shape[1]:]
        if bool(mask.all()):
            return None
        return mask.reshape(-1).nonzero().squeeze(1)

    def _project(self, xs: Tensor, proj: str, offsets: Tensor) -> Tensor:
        """W_e x (+ s * B_e A_e x) for the rows of each expert e."""
        out = self._project_rows(xs, proj, offsets)
        # Not on a checkpointed layer's recomputation: backward runs through the first pass's
        # graph (where the observer already is), never through the recomputed one.
        if self.projection_observer is not None and out.requires_grad and not _in_backward():
            self.projection_observer(self, proj, xs, out, offsets)
        return out

    def _project_rows(self, xs: Tensor, proj: str, offsets: Tensor) -> Tensor:
        weight = getattr(self.experts, f"{proj}_proj")
        if not self.has_lora:
            return grouped_linear(xs, weight, offsets)
        if _use_cpu_loop(xs):
            a, b = self._lora_factors(proj)
            return _ExpertLoRALinear.apply(xs, weight, a, b, offsets, self.scale, True)
        a, b = self._kernel_factors(proj)
        if all(_can_use_grouped_mm(xs, w) for w in (weight, a, b)):
            return _ExpertLoRALinear.apply(xs, weight, a, b, offsets, self.scale, False)
        # Scaling the rank-r intermediate is r/out times cheaper than scaling the output.
        lora = grouped_linear(grouped_linear(xs, a, offsets) * self.scale, b, offsets)
        return grouped_linear(xs, weight, offsets) + lora

    def dispatch(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """Dropless expert computation on the routed (token, expert) pairs only."""
        n_tokens, k = indices.shape
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, deterministic
        counts = torch.bincount(flat, minlength=self.num_experts)
        if self.record_counts and not _in_backward():
            self.token_counts += counts
        token = order // k
        xs = gather_rows(x, token)
        w = gather_rows(weights.reshape(-1), order)
        if self.token_exchange is not None:
            rows, rows_w, offsets, sent = self.token_exchange.dispatch(xs, w, counts)
            y = self.token_exchange.combine(self.compute_experts(rows, rows_w, offsets), sent)
        else:
            offsets = torch.cumsum(counts, 0, dtype=torch.int32)
            y = self.compute_experts(xs, w[:, None], offsets)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def compute_experts(self, xs: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        """The held experts on rows `xs` grouped by expert (`offsets`: cumulative rows per
        expert), each row weighted by its routing weight `w` [S, 1]."""
        gate, up = self._project(xs, "gate_up", offsets).chunk(2, dim=-1)
        # The routing weight goes on the I-wide activation rather than the H-wide output:
        # linear, so the same result, and I <= H in OLMoE.
        h = self.experts.act_fn(gate) * up * w.to(up.dtype)
        return self._project(h, "down", offsets)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, rank={self.rank}, "
                f"active_rank={self.active_rank}, lora_alpha={self.lora_alpha}")
