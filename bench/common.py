"""What every benchmark in bench/ shares: timing GQE against its dense control, describing the machine, and one
results format. See bench/README.md for the convention a new benchmark follows."""

import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch


REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/bench_x.py` from a checkout finds the packages
    sys.path.insert(0, str(REPO_ROOT))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def compare(gqe_fn, dense_fn, device: torch.device, repeats: int, warmup: int = 3) -> tuple[float, float, float]:
    """Alternate GQE and dense runs (after `warmup` runs of each). Returns the median seconds of each and the
    median of the per-pair ratios dense / GQE (> 1: GQE is faster): the two runs of a pair are adjacent in time,
    so the ratio is robust to the slow drifts of a shared machine. Neither side always goes first."""
    for _ in range(warmup):  # allocator, kernel selection, first touch of new buffer sizes
        gqe_fn(), dense_fn()
    gqe_times, dense_times = [], []
    for repeat in range(repeats):
        if repeat % 2 == 0:
            gqe_times.append(timed(gqe_fn, device))
            dense_times.append(timed(dense_fn, device))
        else:
            dense_times.append(timed(dense_fn, device))
            gqe_times.append(timed(gqe_fn, device))
    ratio = statistics.median(dense / gqe for dense, gqe in zip(dense_times, gqe_times))
    return statistics.median(gqe_times), statistics.median(dense_times), ratio


def machine(device: torch.device | str = "cpu") -> str:
    """One line: the processor or GPU, threads, torch and transformers versions, date."""
    import transformers

    device = torch.device(device)
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}, transformers {transformers.__version__}; {date.today().isoformat()}"


def command_line() -> str:
    """The command that is running, as it would be typed from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def markdown_table(columns: list[str], rows: list[dict], formats: dict[str, str] | None = None) -> str:
    """A markdown table of `rows` (dicts) in `columns` order; `formats` maps a column to a format spec."""
    formats = formats or {}

    def cell(row, column):
        value = row.get(column, "-")
        return format(value, formats[column]) if column in formats and isinstance(value, (int, float)) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, column) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, columns: list[str], rows: list[dict], formats: dict[str, str] | None = None,
           json_path: str | None = None, device: torch.device | str = "cpu", notes: list[str] | None = None) -> str:
    """Print (and return) a benchmark's result in the one format RESULTS.md uses: a heading, the machine and
    the exact command, the table, notes; with `json_path`, also write everything as JSON."""
    text = "\n".join([f"## {title}", "", f"Machine: {machine(device)}", f"Command: `{command_line()}`", "",
                      markdown_table(columns, rows, formats), *([""] + notes if notes else [])])
    print(text, flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(
            {"title": title, "machine": machine(device), "command": command_line(), "rows": rows, "notes": notes or []},
            indent=2, default=float,
        ))
    return text
