"""Federated methods, one file each, registered by name (`algorithm.name`)."""
from pipeline.algorithms import (fedavg, fedex_lora, fedsmoothlora, flexlora, flora,  # noqa: F401
                                 frlora, hetlora, smoe, smoe_lb, ubsmoe)  # (registration)
from pipeline.algorithms import alignfed, fedasync, fedbuff  # noqa: F401  (asynchronous)
from pipeline.algorithms.base import (STRATEGIES, ClientPlan, ClientUpdate, ModelInfo, Strategy,
                                      build_strategy, check_method)

__all__ = ["STRATEGIES", "ClientPlan", "ClientUpdate", "ModelInfo", "Strategy", "build_strategy",
           "check_method"]
