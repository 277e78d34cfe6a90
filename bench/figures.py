"""The README's two pictures, drawn from committed results (nothing is measured here).

- bench/figures/speedup.png: GQE's speed-up over transformers' Llama against context length, from the JSON that
  `bench_prefill.py --json` and `bench_decode.py --json` wrote into bench/results/: prefill (attention kernel,
  attention module, 2-layer model, with the module's FLOP ceiling) and decode (with its memory-traffic ceiling).
- bench/figures/routing_heatmap.png: the heatmap of notebooks/04_routing_heatmap.ipynb as executed and committed
  (the expert each token of a sentence picks in an upcycled SmolLM2, per layer and KV group).

    python bench/figures.py
"""

import base64
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


BENCH = Path(__file__).resolve().parent
RESULTS, FIGURES = BENCH / "results", BENCH / "figures"
NOTEBOOK = BENCH.parent / "notebooks" / "04_routing_heatmap.ipynb"


def speedup_figure(out: Path) -> None:
    prefill = json.loads((RESULTS / "prefill.json").read_text())["rows"]
    decode = json.loads((RESULTS / "decode.json").read_text())["decode"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    tokens = [row["tokens"] for row in prefill]
    left.plot(tokens, [row["kernel speed-up"] for row in prefill], marker="o", label="attention kernel")
    left.plot(tokens, [row["attention speed-up"] for row in prefill], marker="o", label="attention module")
    left.plot(tokens, [row["attention FLOP ceiling"] for row in prefill], linestyle="--", color="C1",
              label="attention module, FLOP ceiling")
    model_rows = [row for row in prefill if "model speed-up" in row]
    left.plot([row["tokens"] for row in model_rows], [row["model speed-up"] for row in model_rows], marker="o",
              label="2-layer model")
    left.axhline(16 / 9, color="gray", linestyle=":", label="kernel ceiling 16/9")
    left.set(title="prefill", xlabel="prompt tokens", ylabel="speed-up over Llama (x)", xscale="log")
    lengths = [row["cache length"] for row in decode]
    right.plot(lengths, [row["speed-up"] for row in decode], marker="o", color="C4", label="decode, 4-layer model")
    right.plot(lengths, [row["memory-traffic ceiling"] for row in decode], linestyle="--", color="C4",
               label="memory-traffic ceiling")
    right.set(title="decode (batch 1, DynamicCache)", xlabel="tokens in the cache", xscale="log")
    for axis, ticks in ((left, sorted(set(tokens))), (right, lengths)):
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xticks(ticks)
        axis.set_xticklabels([f"{t // 1024}k" if t >= 1024 else str(t) for t in ticks])
        axis.set_ylim(0.8, 2.15)
        axis.legend(fontsize=8, loc="upper center", ncol=2)
        axis.grid(alpha=0.3)
    fig.suptitle("GQE (paper shape: 16 experts, 8 KV heads, k = 1, 9 of 16 heads attended) vs Llama, CPU fp32")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def notebook_figure(out: Path) -> None:
    notebook = json.loads(NOTEBOOK.read_text())
    images = [output["data"]["image/png"] for cell in notebook["cells"] if cell["cell_type"] == "code"
              for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    if not images:
        raise SystemExit(f"{NOTEBOOK} has no figure: execute it and save it first")
    out.write_bytes(base64.b64decode(images[0]))


def main():
    FIGURES.mkdir(exist_ok=True)
    speedup_figure(FIGURES / "speedup.png")
    notebook_figure(FIGURES / "routing_heatmap.png")
    print(f"wrote {FIGURES / 'speedup.png'} and {FIGURES / 'routing_heatmap.png'}")


if __name__ == "__main__":
    main()
