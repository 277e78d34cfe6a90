"""Calibration of a sparse GQE conversion: routers and slot output projections fitted layer by layer.

A sparse conversion keeps K of the r query heads of each group per token. Two things are lost: the dropped
heads' contributions, and each head's own output projection (a GQE hard slot has one projection, whichever
expert fills it). Both are repaired, layer by layer, on the converted model's own activations:

1. Router: per token, how much each source head contributes (the norm of its projected output) is what an
   oracle would route on. The router is a ridge regression from the layer's normalised input onto the
   centred log of those norms, so it learns to pick, per token, the heads that matter most.
2. Output projection: with the router set, the GQE layer's slot features (G*K hard slots, the weighted slot,
   the shared head) are a fixed function of the input, and the source attention's output is the target.
   `o_proj` is their ridge-regression fit: the best linear read-out of the kept heads, which also lets the
   shared head and the weighted slot stand in for the dropped heads' average contribution.
3. The converted layer (with its new weights) produces the next layer's input, so later layers are fitted on
   what they will actually see.
"""

import math

import torch
from tqdm.auto import tqdm


def split_calibration_text(tokenizer, text: str, fit_tokens: int, seq_len: int = 256, held_out_tokens: int = 8192):
    """First 90% of the text for the fit, the last 10% held out. Returns two [n, seq_len] id tensors."""
    cut = int(len(text) * 0.9)

    def blocks(part: str, limit: int) -> torch.Tensor:
        ids = tokenizer(part, add_special_tokens=False).input_ids
        usable = min(limit, len(ids)) // seq_len * seq_len
        if usable == 0:
            raise ValueError(f"the calibration text is too short: need at least {seq_len} tokens in each split")
        return torch.tensor(ids[:usable]).view(-1, seq_len)

    return blocks(text[:cut], fit_tokens), blocks(text[cut:], held_out_tokens)


@torch.no_grad()
def held_out_perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size]
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, relative_ridge: float) -> torch.Tensor:
    """argmin_W ||X W - Y||^2 + lambda ||W||^2 from X^T X and X^T Y, lambda relative to the mean diagonal."""
    ridge = relative_ridge * gram.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * eye, cross)


def capture_input(module):
    """Context helper: records the input of `module` (e.g. an o_proj) on the next forward."""
    store = {}

    def hook(_, args):
        store["input"] = args[0].detach()

    return store, module.register_forward_pre_hook(hook)


@torch.no_grad()
def calibrate_sparse(source, model, fit_ids: torch.Tensor, batch_size: int = 8, seed: int = 0,
                     router_ridge: float = 1e-2, output_ridge: float = 1e-4) -> None:
    """Fit routers and o_proj of `model` (sparse GQE built from `source`) on `fit_ids` [n, T], in place."""
    torch.manual_seed(seed)
    for network in (source, model):
        network.eval()
        network.set_attn_implementation("sdpa")  # mask-free causal attention below relies on sdpa's is_causal
    config = model.config
    G, M, H = config.num_key_value_heads, config.num_experts_per_group, source.config.num_attention_heads
    d = config.head_dim
    seq_len = fit_ids.shape[1]
    position_ids = torch.arange(seq_len)[None]

    batches = list(fit_ids.split(batch_size))
    hidden = [model.model.embed_tokens(batch) for batch in batches]  # converted residual stream, per batch
    position_embeddings = model.model.rotary_emb(hidden[0], position_ids)

    for source_layer, layer in tqdm(
        list(zip(source.model.layers, model.model.layers)), desc="calibrating layers", unit="layer"
    ):
        source_attn, attn = source_layer.self_attn, layer.self_attn
        o_weight = source_attn.o_proj.weight.view(-1, H, d)  # [D, H, d]
        normed = [layer.input_layernorm(x) for x in hidden]

        # 1. Router: regress per-head log contribution norms on the normalised input.
        targets, router_gram, router_cross = [], 0.0, 0.0
        store, handle = capture_input(source_attn.o_proj)
        for h in normed:
            target = source_attn(h, position_embeddings=position_embeddings, attention_mask=None)[0]
            targets.append(target)
            head_outputs = store["input"].view(*h.shape[:2], H, d)  # [b, T, H, d]
            contribution = torch.einsum("bthd,ohd->btho", head_outputs, o_weight).norm(dim=-1)  # [b, T, H]
            log_norm = contribution.clamp(min=1e-6).log().view(*h.shape[:2], G, M)
            log_norm = log_norm - log_norm.mean(dim=-1, keepdim=True)
            x = h.reshape(-1, h.shape[-1]).double()
            router_gram = router_gram + x.T @ x
            router_cross = router_cross + x.T @ log_norm.reshape(x.shape[0], G * M).double()
        handle.remove()
        attn.router.weight.copy_(ridge_solve(router_gram, router_cross, router_ridge).T.to(attn.router.weight.dtype))

        # 2. Output projection: regress the source attention output on the GQE slot features.
        bias = attn.o_proj.bias
        output_gram, output_cross = 0.0, 0.0
        store, handle = capture_input(attn.o_proj)
        for h, target in zip(normed, targets):
            attn(h, position_embeddings=position_embeddings, attention_mask=None)
            features = store["input"].reshape(-1, store["input"].shape[-1]).double()
            y = target.reshape(-1, target.shape[-1]).double()
            if bias is not None:
                y = y - bias.double()
            output_gram = output_gram + features.T @ features
            output_cross = output_cross + features.T @ y
        handle.remove()
        attn.o_proj.weight.copy_(ridge_solve(output_gram, output_cross, output_ridge).T.to(attn.o_proj.weight.dtype))

        # 3. Next layer's input, through the converted layer as it now is.
        hidden = [
            layer(x, position_embeddings=position_embeddings, position_ids=position_ids, attention_mask=None)
            for x in hidden
        ]
