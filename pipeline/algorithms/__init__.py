"""Federated methods, one file each, registered by name (`algorithm.name`)."""
from pipeline.algorithms import (fedavg, fedex_lora, flexlora, flora, hetlora, smoe,  # noqa: F401
                                 smoe_lb, ubsmoe)  # (registration)
from pipeline.algorithms.base import (STRATEGIES, ClientPlan, ClientUpdate, ModelInfo, Strategy,
                                      build_strategy, check_method)

__all__ = ["STRATEGIES", "ClientPlan", "ClientUpdate", "ModelInfo", "Strategy", "build_strategy",
           "check_method"]
