"""The federated workload of bench/peer_flower.py, shared by its three implementations.

A tiny OLMoE with random weights (hidden 128, 4 layers, 16 experts, top-4, vocabulary 512),
LoRA r8 (alpha 16) on attention q/k/v/o and on the experts, 8 clients x 10 AdamW steps of batch
8 x 128 random tokens per round, 3 rounds, FedAvg. Every implementation draws the same client
batches through fedmoe's own seeding (`local_batches`, `derive_seed`), starts from the same
adapters (`init_adapter_state`) and keeps the adapters in fedmoe's naming, so the final adapters
of all of them can be compared entry by entry.

The plain loop and Flower's clients train Hugging Face's OLMoE with peft's LoRA (attention via
`target_modules`, the fused experts via `target_parameters`); fedmoe trains its own block.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from transformers import OlmoeConfig

from pipeline.federation.sampling import ADAPTER_INIT, LOCAL_DATA, derive_seed, local_batches

SEED = 0
MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=64, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
             max_position_embeddings=256, norm_topk_prob=False, pad_token_id=0, eos_token_id=None)
RANK, ALPHA = 8, 16.0
BATCH, SEQ = 8, 128
# A smaller run for a busy machine: bench/peer_flower.py --clients/--steps/--rounds set these.
CLIENTS, STEPS, ROUNDS = (int(os.environ.get(f"PEER_{k}", d)) for k, d in (("CLIENTS", 8), ("STEPS", 10), ("ROUNDS", 3)))
LR, GRAD_CLIP = 2e-3, 1.0  # fedmoe's defaults (weight decay 0); the peft loops use the same
ROWS = STEPS * BATCH  # random sequences a client holds; each round walks a fresh permutation
DATA_STREAM = 100  # a seed stream of our own for the random tokens


def olmoe_config() -> OlmoeConfig:
    return OlmoeConfig(**MODEL)


def base_model():
    """Hugging Face's OlmoeForCausalLM, random weights, identical in every process."""
    from pipeline.model.build import build_model

    return build_model(MODEL, seed=SEED)


class RandomTokens:
    """Each client's ROWS random sequences; `train_batch` is what fedmoe's round loop calls
    (the duck type of `FederatedData`), `client_batches` what the peft loops call."""

    def __init__(self):
        gen = torch.Generator().manual_seed(derive_seed(SEED, DATA_STREAM))
        self.rows = torch.randint(0, MODEL["vocab_size"], (CLIENTS * ROWS, SEQ), generator=gen)
        self.client_indices = [list(range(c * ROWS, (c + 1) * ROWS)) for c in range(CLIENTS)]
        self.train_examples, self.eval_examples, self.truncated = self.rows, [], 0

    def train_batch(self, indices: list[int]) -> dict[str, Tensor]:
        ids = self.rows[indices]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def client_batches(self, round_: int, client: int):
        """The batches fedmoe's `train_client` draws for (round, client), in order."""
        seed = derive_seed(SEED, LOCAL_DATA, round_, client)
        return (self.train_batch(b) for b in local_batches(self.client_indices[client], STEPS, BATCH, seed))


def initial_adapters() -> dict[str, Tensor]:
    """fedmoe's round-0 adapters (what `assembly.setup` gives the strategy)."""
    from pipeline.model import init_adapter_state, patch_olmoe

    model = patch_olmoe(base_model(), lora_rank=RANK, lora_alpha=ALPHA)
    return init_adapter_state(model, derive_seed(SEED, ADAPTER_INIT))


# ---------------------------------------------------------------------------------------------
# peft: the model, and the map between its adapter tensors and fedmoe's names


def peft_model():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    return get_peft_model(base_model(), config)


def peft_slots(model) -> dict[str, tuple[Tensor, Tensor, str]]:
    """fedmoe name -> (peft parameter, kind). kinds: 'A'/'B' of a Linear LoRA (same layout as
    ours), 'expert_A'/'expert_B' of a fused-expert LoRA (peft stacks the experts into one
    nn.Linear: A [r*E, in] with row e*r + k, B [out, r*E] with column k*E + e)."""
    from peft.tuners.lora.layer import ParamWrapper

    slots = {}
    for i, layer in enumerate(model.base_model.model.model.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mod = getattr(layer.self_attn, proj)
            prefix = f"model.layers.{i}.self_attn.{proj}"
            slots[f"{prefix}.lora_A"] = (mod.lora_A["default"].weight, "A")
            slots[f"{prefix}.lora_B"] = (mod.lora_B["default"].weight, "B")
        mod = layer.mlp.experts
        while isinstance(mod, ParamWrapper):
            short = {"gate_up_proj": "gate_up", "down_proj": "down"}[mod.parameter_name]
            prefix = f"model.layers.{i}.mlp.lora_{short}"
            slots[f"{prefix}_A"] = (mod.lora_A["default"].weight, "expert_A")
            slots[f"{prefix}_B"] = (mod.lora_B["default"].weight, "expert_B")
            mod = mod.base_layer
    return slots


def to_peft(value: Tensor, kind: str) -> Tensor:
    if kind == "expert_A":  # ours [E, r, in]
        return value.reshape(-1, value.shape[-1])
    if kind == "expert_B":  # ours [E, out, r]
        return value.permute(1, 2, 0).reshape(value.shape[1], -1)
    return value


def from_peft(value: Tensor, kind: str) -> Tensor:
    E = MODEL["num_experts"]
    if kind == "expert_A":
        return value.reshape(E, RANK, value.shape[-1])
    if kind == "expert_B":
        return value.reshape(value.shape[0], RANK, E).permute(2, 0, 1).contiguous()
    return value


def load_peft(slots, state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, (param, kind) in slots.items():
            param.copy_(to_peft(state[name], kind))


def read_peft(slots) -> dict[str, Tensor]:
    return {name: from_peft(param.detach(), kind).clone() for name, (param, kind) in slots.items()}


def train_peft_client(model, slots, start: dict[str, Tensor], batches) -> dict[str, Tensor]:
    """One client's local training: what fedmoe's ClientEngine does (fresh AdamW, clipping at
    the global norm), as a plain PyTorch loop."""
    load_peft(slots, start)
    params = [p for p, _ in slots.values()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return read_peft(slots)


def fedavg(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    total = float(sum(weights))
    return {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in states[0]}


# ---------------------------------------------------------------------------------------------
# Flower's client. Module-level, so that Ray's pickling refers to it by name and each actor
# keeps its model in _ACTOR across calls (a function of a __main__ script is pickled by value,
# with a fresh cache on every call).

_ACTOR: dict = {}


def flower_train(msg, context):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    if not _ACTOR:
        torch.set_num_threads(int(os.environ["PEER_THREADS"]))
        model = peft_model()
        _ACTOR.update(model=model, slots=peft_slots(model), data=RandomTokens())
    start = msg.content["arrays"].to_torch_state_dict()
    round_ = int(msg.content["config"]["server-round"])
    client = int(context.node_config["partition-id"])
    state = train_peft_client(_ACTOR["model"], _ACTOR["slots"], start,
                              _ACTOR["data"].client_batches(round_, client))
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=state),
                          "metrics": MetricRecord({"num-examples": ROWS})})
    return Message(content=content, reply_to=msg)
