"""How a GQE attention layer is split over tensor-parallel ranks: plain torch, no vLLM, so that the arithmetic is
tested in the transformers environment against the unsharded model.

Each of N ranks owns G/N whole KV groups: their experts' query rows, their router rows, their KV head and their
G/N*k hard output slots. Two slots span all groups. The weighted slot (variant "gqe") is a probability-weighted
sum over every selected head, normalised over all G*k picks: each rank computes its groups' part of the sum
with the global normaliser, and `o_proj`'s all-reduce adds the parts. The shared slot is the same on every rank,
so only rank 0's `o_proj` columns for it are non-zero.
"""

import torch


def rank_groups(num_key_value_heads: int, rank: int, tensor_parallel_size: int) -> range:
    """The KV groups (and so the experts, router rows, KV head, hard slots) that `rank` owns."""
    local = num_key_value_heads // tensor_parallel_size
    return range(rank * local, (rank + 1) * local)


def rank_output_columns(o_proj_weight: torch.Tensor, num_key_value_heads: int, top_k: int, head_dim: int,
                        has_shared_head: bool, rank: int, tensor_parallel_size: int) -> torch.Tensor:
    """The [D, S_local*d] columns of the checkpoint's [D, S*d] `o_proj` weight that `rank` multiplies: its groups'
    hard slots, then (variant "gqe") the weighted slot's columns (every rank: each holds a partial sum) and the
    shared slot's columns (rank 0; zeros elsewhere, so the shared head counts once in the all-reduce)."""
    hard_width = num_key_value_heads // tensor_parallel_size * top_k * head_dim
    pieces = [o_proj_weight[:, rank * hard_width : (rank + 1) * hard_width]]
    if has_shared_head:
        all_hard = num_key_value_heads * top_k * head_dim
        weighted = o_proj_weight[:, all_hard : all_hard + head_dim]
        shared = o_proj_weight[:, all_hard + head_dim : all_hard + 2 * head_dim]
        pieces += [weighted, shared if rank == 0 else torch.zeros_like(shared)]
    return torch.cat(pieces, dim=1)
