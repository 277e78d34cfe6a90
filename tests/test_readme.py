"""The README's Quickstart runs as written and prints what its comments say."""

import contextlib
import io
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
    section = README.read_text().split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_prints_what_its_comments_say(tmp_path, monkeypatch):
    code = quickstart_code()
    monkeypatch.chdir(tmp_path)  # it saves "my-gqe" in the working directory
    torch.manual_seed(0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_quickstart"})
    lines = printed.getvalue().splitlines()
    assert lines[0] == "9 of 16 query heads attended per token" and "# 9 of 16" in code
    assert lines[-1] == "torch.Size([1, 9, 12, 12])" and "# [1, 9, 12, 12]" in code
    assert (tmp_path / "my-gqe" / "modeling_gqe.py").is_file() and (tmp_path / "my-gqe" / "config.json").is_file()
