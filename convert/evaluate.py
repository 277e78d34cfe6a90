"""Evaluating checkpoints: perplexity on blocks of token ids."""

import math

import torch


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over blocks [n, T], each block scored on its own."""
    total_nll, total_tokens = 0.0, 0
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, input_ids.shape[0], batch_size):
        batch = input_ids[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
