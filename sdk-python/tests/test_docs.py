"""Docstring examples and the README's Python examples, executed against a real service."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

import jobplane
from jobplane import _client, _types, _worker

READMES = [
    Path(__file__).resolve().parents[1] / "README.md",
    Path(__file__).resolve().parents[2] / "README.md",
]


@pytest.mark.parametrize("module", [jobplane, _client, _types, _worker], ids=lambda m: m.__name__)
def test_docstring_examples(module: object, addr: str) -> None:
    result = doctest.testmod(
        module, extraglobs={"addr": addr, "jobplane": jobplane}, optionflags=doctest.ELLIPSIS
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed"


@pytest.mark.parametrize("readme", READMES, ids=["sdk-python/README.md", "README.md"])
def test_readme_examples(readme: Path, addr: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of the README runs, in order, in one namespace."""
    monkeypatch.setenv("JOBPLANE_ADDR", addr)
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert blocks, "the README has Python examples"
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        exec(compile(block, str(readme), "exec"), namespace)  # noqa: S102
