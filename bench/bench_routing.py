"""How much of a sparse conversion's loss is the router's? SmolLM2-135M -> sparse K, perplexity on each domain's
held-out text, five ways:

- the source model;
- the source with heads dropped per token, no refit: (a) each group keeps its K largest heads on that token,
  (b) each slot of the converter's layout keeps its largest head (what the fitted router is asked to predict);
- the converted model with its fitted routers;
- the converted model with oracle selection: per token and slot, the expert whose source head contributes most
  (source attention on the same converted input), keeping the fitted router's probabilities for the weighted slot.

The head-dropping rows show what choosing heads costs before anything compensates for the dropped ones (the
converter's o_proj fit, shared head and weighted slot); the last two rows show how far the fitted linear routers
are from their oracle. A head's contribution is the norm of its output after o_proj, as in the calibration
(`convert.fit.head_contributions`).

    python bench/bench_routing.py                        # K = 2, 65536 calibration tokens of all domains mixed
    python bench/bench_routing.py --refine-epochs 2 --json bench/results/routing_oracle.json
"""

import argparse
import time

import torch

import common  # noqa: F401  (puts the repository on sys.path when run from a checkout)
from common import report

from convert.data import load_token_blocks
from convert.evaluate import DOMAINS, check_domains, perplexity
from convert.fit import calibrate_sparse, head_contributions
from convert.layout import build_sparse_initial
from convert.resources import SMOLLM2_GGUF, smollm2_folder
from convert.sources import load_source
from modeling_gqe.modeling_gqe import select_experts


class SourceHeads:
    """Hooks on the source's o_proj inputs: records each layer's per-head contributions [b, t, H] and, when a
    `keep` rule is set, zeroes the heads it does not keep."""

    def __init__(self, source):
        config = source.config
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.keep = None  # (layer index, contribution [b, t, H]) -> 0/1 mask [b, t, H]
        self.contribution = {}
        for index, layer in enumerate(source.model.layers):
            layer.self_attn.o_proj.register_forward_pre_hook(self.hook(index, layer.self_attn.o_proj.weight))

    def hook(self, index, o_weight):
        o_weight = o_weight.view(-1, self.num_heads, self.head_dim)  # [D, H, d]

        def drop_heads(_, args):
            heads = args[0].view(*args[0].shape[:2], self.num_heads, self.head_dim)
            contribution = head_contributions(heads, o_weight)  # [b, t, H]
            self.contribution[index] = contribution
            if self.keep is not None:
                return ((heads * self.keep(index, contribution).unsqueeze(-1)).view_as(args[0]),)
            return None

        return drop_heads


def group_top_k(num_groups, top_k):
    """Each group keeps its top_k largest heads on the token."""
    def keep(_, contribution):
        grouped = contribution.view(*contribution.shape[:2], num_groups, -1)
        return torch.zeros_like(grouped).scatter_(-1, grouped.topk(top_k, dim=-1).indices, 1.0).view_as(contribution)
    return keep


def slot_largest(slot_heads):
    """Each slot keeps the largest of its heads on the token. slot_heads[layer]: [G*K, width] source head ids."""
    def keep(index, contribution):
        heads = slot_heads[index]
        best = contribution[..., heads].argmax(-1, keepdim=True)  # [b, t, G*K, 1]
        chosen = heads.expand(*contribution.shape[:2], *heads.shape).gather(-1, best).squeeze(-1)
        return torch.zeros_like(contribution).scatter_(-1, chosen, 1.0)
    return keep


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--calibration-tokens", type=int, default=65536)
    parser.add_argument("--refine-epochs", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    source, tokenizer = load_source(str(smollm2_folder()), SMOLLM2_GGUF)
    sources = check_domains(DOMAINS)  # every domain's data, or an error naming what is missing
    eval_blocks = {domain: load_token_blocks([sources[domain]], tokenizer, 512, 512,
                                             held_out_tokens=args.eval_tokens).held_out for domain in DOMAINS}
    fit_ids = load_token_blocks([sources[domain] for domain in DOMAINS], tokenizer, 256, args.calibration_tokens).fit
    model = build_sparse_initial(source, args.top_k)
    start = time.time()
    expert_heads = calibrate_sparse(source, model, fit_ids, refine_epochs=args.refine_epochs)  # [L, G*M]
    minutes = (time.time() - start) / 60
    config = model.config
    G, M, K = config.num_key_value_heads, config.num_experts_per_group, config.num_experts_per_tok
    slot_heads = expert_heads.view(-1, G * K, M // K)  # partitioned routing: slot j of group g is a block of M/K

    heads = SourceHeads(source)
    agreement = [0, 0]  # shared slots whose fitted choice is the oracle's head, shared slots

    def oracle_selection(router, args_, output):
        logits, _, fitted_index = output
        x = args_[0]
        index = router.layer_index
        positions = torch.arange(x.shape[1])[None]
        source.model.layers[index].self_attn(x, position_embeddings=source.model.rotary_emb(x, positions),
                                             attention_mask=None)
        oracle_logits = heads.contribution[index][..., expert_heads[index]].view(*x.shape[:2], G, M)
        _, oracle_index = select_experts(oracle_logits, K, "partitioned")  # [b, t, G, K]
        offsets = (torch.arange(G) * M)[:, None]
        fitted_head, oracle_head = (expert_heads[index][chosen + offsets] for chosen in (fitted_index, oracle_index))
        shared = (slot_heads[index] != slot_heads[index][:, :1]).any(-1).view(G, K)  # slots of more than one head
        agreement[0] += (fitted_head == oracle_head)[..., shared].sum().item()
        agreement[1] += shared.sum().item() * x.shape[0] * x.shape[1]
        probabilities = logits.view(*x.shape[:2], G, M).softmax(-1)
        return logits, probabilities.gather(-1, oracle_index), oracle_index

    rows = []

    def measure(name, network):
        ppl = {domain: perplexity(network, blocks) for domain, blocks in eval_blocks.items()}
        rows.append({"model": name, **ppl})
        print(rows[-1], flush=True)

    with torch.no_grad():
        measure("source", source)
        heads.keep = group_top_k(G, K)
        measure(f"source, each group keeps its {K} largest heads per token", source)
        heads.keep = slot_largest(slot_heads)
        measure("source, each slot keeps its largest head per token", source)
        heads.keep = None
        measure("converted, fitted routers", model)
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.router.layer_index = index
            layer.self_attn.router.register_forward_hook(oracle_selection)
        measure("converted, oracle selection", model)
    for row in rows:
        for domain in DOMAINS:
            row[f"{domain} / source"] = row[domain] / rows[0][domain]
    columns = ["model", *[f"{domain} / source" for domain in DOMAINS]]
    report(f"Sparse K = {K}: the router against its oracle (perplexity / source's)", columns, rows,
           {column: ".3f" for column in columns[1:]}, json_path=args.json,
           notes=[f"Calibration: {args.calibration_tokens} tokens of {', '.join(DOMAINS)} mixed, refine epochs "
                  f"{args.refine_epochs}, {minutes:.1f} minutes. Held-out perplexity of the source: "
                  + ", ".join(f"{domain} {rows[0][domain]:.2f}" for domain in DOMAINS) + ".",
                  f"Fitted routers pick the oracle's head in {agreement[0] / max(agreement[1], 1):.1%} of the "
                  "selections in slots of more than one head (held-out text of all domains)."])


if __name__ == "__main__":
    main()
