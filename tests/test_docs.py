"""Every ```python block of the docs and the README runs."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCKS = [(path.name, i, code) for path in DOCS
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))]


@pytest.mark.parametrize("name,index,code", BLOCKS, ids=[f"{n}#{i}" for n, i, _ in BLOCKS])
def test_doc_example_runs(name, index, code):
    from zygote_torch.ad.registry import REGISTRY
    rules, non_diff = dict(REGISTRY._rules), set(REGISTRY._non_differentiable)
    try:
        exec(compile(code, f"{name}#{index}", "exec"), {"__name__": f"doc_{index}"})
    finally:  # an example may register a rule for a built-in function: don't let it leak
        REGISTRY._rules, REGISTRY._non_differentiable = rules, non_diff
        REGISTRY.version += 1
