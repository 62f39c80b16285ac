"""`smoe-lb`: naive heterogeneous SMoE plus DeepSeek-style loss-free load balancing.

Each MoE layer carries a bias b that is added to the router probabilities for expert
*selection only* (the gate weights stay the unbiased probabilities). After every local step a
client moves b_i += u * sign(mean_load - load_i) from that step's routed counts; the server
averages the clients' biases with FedAvg weights [choice] and broadcasts the result, which is
also used at evaluation. Adapters are aggregated as in `smoe`.
"""
from __future__ import annotations

import torch

from pipeline.algorithms import routing_math as rm
from pipeline.algorithms.base import ClientPlan, ClientUpdate, register
from pipeline.algorithms.options import Option
from pipeline.algorithms.smoe import NaiveSMoE
from pipeline.model.setting import ModelSetting


@register
class SMoELoadBalanced(NaiveSMoE):
    name = "smoe-lb"
    option_spec = {"rate": Option(1e-3, float, low=0.0)}  # 0: no balancing

    def init_state(self, initial_adapters):
        super().init_state(initial_adapters)
        self.bias = torch.zeros(self.model.num_layers, self.model.num_experts)

    def state_dict(self):
        state = super().state_dict()
        state["tensors"]["selection_bias"] = self.bias
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.bias = state["tensors"]["selection_bias"].clone()

    def setting(self, top_k: int, lora_rank: int) -> ModelSetting:
        return ModelSetting(top_k, lora_rank, selection_bias=self.bias)

    def configure_model(self, model, plan: ClientPlan | None) -> None:
        self._seen = None

    @torch.no_grad()
    def after_backward(self, model, plan: ClientPlan) -> None:
        from pipeline.model import expert_token_counts
        from pipeline.model.routing import selection_bias, set_selection_bias

        counts = expert_token_counts(model)
        step_load = counts - (self._seen if self._seen is not None else 0)
        self._seen = counts.clone()
        set_selection_bias(model, rm.loss_free_bias_update(selection_bias(model), step_load.float(),
                                                           self.options["rate"]))

    def client_extras(self, model, plan: ClientPlan):
        from pipeline.model.routing import selection_bias

        return {"selection_bias": selection_bias(model).clone()}

    def contribution(self, update: ClientUpdate):
        out = super().contribution(update)
        out["bias"] = update.extras["selection_bias"].double() * update.n_samples
        return out

    def finalize(self, sums) -> dict:
        metrics = super().finalize(sums)
        self.bias = (sums["bias"] / sums["weight"].item()).float()
        return metrics
