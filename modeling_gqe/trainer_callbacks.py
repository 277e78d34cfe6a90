"""Routing figures in `Trainer` logs: `Trainer(..., callbacks=[GQERoutingCallback()])`.

Adds to every training log line:
- `aux_loss`: the load-balancing loss the model added to the LM loss (before `router_aux_loss_coef`),
- `router_entropy`: mean over layers of the router's normalised entropy (1 = uniform, 0 = one-hot),
- `expert_load_max`: mean over layers of the busiest expert's share of its group's picks relative to a
  perfectly balanced share (1 = balanced, M/k = one expert takes everything),
- `router_entropy/layer_{i}` and `expert_load_max/layer_{i}` for each layer.

It hooks the routers and the model's output when training starts (no change to the model or the loop) and
averages over all training forwards since the previous log. Works with models loaded through
`trust_remote_code` too, since routers are found by class name.
"""

from collections import defaultdict

import torch
from transformers import TrainerCallback

from .modeling_gqe import routing_statistics


def _is_router(module) -> bool:
    return type(module).__name__ == "GQETopKRouter"


class GQERoutingCallback(TrainerCallback):
    def __init__(self):
        self._handles = []
        self._reset()

    def _reset(self):
        self._sums = defaultdict(float)
        self._counts = defaultdict(int)

    def _add(self, key, value):
        self._sums[key] += float(value)
        self._counts[key] += 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or self._handles:
            return
        # Named by the decoder layer they sit in ("...layers.7.self_attn.router"): layers in the config's
        # `dense_attention_layers` have no router, so counting routers would misname the ones after them.
        routers = [(name, module) for name, module in model.named_modules() if _is_router(module)]
        for count, (name, router) in enumerate(routers):
            parts = name.split(".")
            layer_idx = int(parts[parts.index("layers") + 1]) if "layers" in parts[:-1] else count
            self._handles.append(router.register_forward_hook(self._router_hook(layer_idx)))
        self._handles.append(model.register_forward_hook(self._model_hook))

    def _router_hook(self, layer_idx):
        def hook(router, inputs, outputs):
            if not router.training:
                return
            with torch.no_grad():
                statistics = routing_statistics((outputs[0],), router.num_groups, router.top_k, router.expert_routing)
                share = statistics["selected_fraction"][0] / router.top_k  # [G, M]: sums to 1 per group
                load_max = (share.max(-1).values * router.experts_per_group).mean()
            self._add(f"router_entropy/layer_{layer_idx}", statistics["entropy"][0])
            self._add(f"expert_load_max/layer_{layer_idx}", load_max)

        return hook

    def _model_hook(self, model, inputs, outputs):
        aux_loss = getattr(outputs, "aux_loss", None)
        if model.training and aux_loss is not None:
            self._add("aux_loss", aux_loss.detach())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._counts:
            return
        figures = {key: self._sums[key] / self._counts[key] for key in self._counts}
        for name in ("router_entropy", "expert_load_max"):
            per_layer = [value for key, value in figures.items() if key.startswith(name + "/")]
            if per_layer:
                figures[name] = sum(per_layer) / len(per_layer)
        figures = {key: round(value, 4) for key, value in figures.items()}
        logs.update(figures)
        if state.log_history:
            state.log_history[-1].update(figures)
        self._reset()

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []
