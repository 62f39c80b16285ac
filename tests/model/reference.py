"""Independent reference computations for the block tests."""
import torch
import torch.nn.functional as F

from pipeline.model.moe_block import HeteroMoEBlock


def dense_reference(block: HeteroMoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token with W + s*B@A materialised, then the routing mask."""
    E, k, s = block.num_experts, block.top_k, block.scale
    probs = F.softmax(x @ block.gate.weight.T, dim=-1, dtype=torch.float32)
    top, idx = torch.topk(probs, k, dim=-1)
    if block.norm_topk_prob:
        top = top / top.sum(-1, keepdim=True)
    gate_weight = torch.zeros_like(probs).scatter(1, idx, top)  # [N, E]
    out = torch.zeros_like(x)
    r = block.active_rank
    for e in range(E):
        w_gu = block.experts.gate_up_proj[e] + s * block.lora_gate_up_B[e, :, :r] @ block.lora_gate_up_A[e, :r]
        w_d = block.experts.down_proj[e] + s * block.lora_down_B[e, :, :r] @ block.lora_down_A[e, :r]
        g, u = (x @ w_gu.T).chunk(2, dim=-1)
        out = out + gate_weight[:, e:e + 1] * ((F.silu(g) * u) @ w_d.T)
    return out
