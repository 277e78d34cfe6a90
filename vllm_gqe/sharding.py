"""How a GQE attention layer is split over tensor-parallel ranks: plain torch, no vLLM, so that the arithmetic is
tested in the transformers environment against the unsharded model.

Each of N ranks owns G/N whole KV groups: their experts' query rows, their router rows, their KV head and their
G/N*k hard output slots. The "gqe" variant's shared head is on every rank: its query rows, and its key and value
rows, which are the mean over all G groups of k_proj's and v_proj's rows (the mean of the groups' projections is
the projection by their mean rows, and RoPE rotates every head alike, so this is the mean of the rotated keys that
the shared head attends to); each rank thus computes the shared K/V itself, with no all-reduce. Two output slots
span all groups. The weighted slot (variant "gqe") is a probability-weighted
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


def projection_layout(local_groups: int, experts_per_group: int, head_dim: int, has_shared_head: bool) -> dict[str, slice]:
    """Where each piece sits in one rank's output of the fused query/key/value projection: its groups' query
    experts ("q"), then (variant "gqe") the shared query ("q_shared"); its groups' keys ("k"), then the shared key
    ("k_mean"); its groups' values ("v"), then the shared value ("v_mean"). So the keys (and the values) are G/N
    heads, plus the shared one as head G/N."""
    d = head_dim
    sizes = {"q": local_groups * experts_per_group * d, "q_shared": d,
             "k": local_groups * d, "k_mean": d, "v": local_groups * d, "v_mean": d}
    layout, start = {}, 0
    for piece, size in sizes.items():
        if piece in ("q", "k", "v") or has_shared_head:
            layout[piece] = slice(start, start + size)
            start += size
    return layout


def rank_projection_rows(loaded: torch.Tensor, checkpoint_tensor: str, num_key_value_heads: int,
                         has_shared_head: bool, rank: int, tensor_parallel_size: int) -> dict[str, torch.Tensor]:
    """The rows that `rank`'s fused projection takes from one checkpoint tensor, by piece of `projection_layout`.
    `checkpoint_tensor` is "q" (q_proj), "q_shared", "k" (k_proj) or "v" (v_proj); `loaded` its weight [rows, D] or
    bias [rows]. The rows of the rank's groups; q_shared whole; for k and v (variant "gqe") also their mean over
    all G groups, taken in fp32."""
    if checkpoint_tensor == "q_shared":
        return {"q_shared": loaded}
    per_group = loaded.unflatten(0, (num_key_value_heads, -1))  # [G, rows per group(, D)]
    groups = rank_groups(num_key_value_heads, rank, tensor_parallel_size)
    rows = {checkpoint_tensor: per_group[groups.start : groups.stop].flatten(0, 1)}
    if has_shared_head and checkpoint_tensor in ("k", "v"):
        rows[f"{checkpoint_tensor}_mean"] = per_group.float().mean(dim=0)
    return rows
