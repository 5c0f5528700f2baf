"""Model registry: ``create_model(name, in_channels, num_classes, **kwargs)``."""

from medseg.models.registry import count_parameters, create_model, get_entry, list_models, register_model

__all__ = ["count_parameters", "create_model", "get_entry", "list_models", "register_model"]
