"""Grouped Query Experts for Hugging Face Transformers.

Importing this package registers the "gqe" model type with the Auto classes, so that
`AutoModelForCausalLM.from_pretrained(folder)` works without `trust_remote_code`, and marks the classes
for `register_for_auto_class`, so that `save_pretrained` writes `auto_map` and copies the two standalone
files (`configuration_gqe.py`, `modeling_gqe.py`) for loading with `trust_remote_code=True` elsewhere.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_gqe import GQEConfig
from .modeling_gqe import (
    GQEForCausalLM,
    GQEForQuestionAnswering,
    GQEForSequenceClassification,
    GQEForTokenClassification,
    GQEModel,
    GQEPreTrainedModel,
    load_balancing_loss_func,
    routed_layers_top_k,
    routing_statistics,
)
from .trainer_callbacks import GQERoutingCallback


AutoConfig.register("gqe", GQEConfig, exist_ok=True)
AutoModel.register(GQEConfig, GQEModel, exist_ok=True)
AutoModelForCausalLM.register(GQEConfig, GQEForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(GQEConfig, GQEForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(GQEConfig, GQEForTokenClassification, exist_ok=True)
AutoModelForQuestionAnswering.register(GQEConfig, GQEForQuestionAnswering, exist_ok=True)

GQEConfig.register_for_auto_class()
GQEModel.register_for_auto_class("AutoModel")
GQEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
GQEForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
GQEForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
GQEForQuestionAnswering.register_for_auto_class("AutoModelForQuestionAnswering")

__all__ = [
    "GQEConfig",
    "GQEPreTrainedModel",
    "GQEModel",
    "GQEForCausalLM",
    "GQEForSequenceClassification",
    "GQEForTokenClassification",
    "GQEForQuestionAnswering",
    "load_balancing_loss_func",
    "routed_layers_top_k",
    "routing_statistics",
    "GQERoutingCallback",
]
