"""fedmoe: resource-adaptive federated fine-tuning of Mixture-of-Experts models."""
__version__ = "0.1.0"
