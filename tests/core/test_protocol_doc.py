"""docs/PROTOCOL.md's worked examples (single-part and multi-part) are exactly what the code
produces."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("script", ["protocol_example.py", "protocol_parts_example.py"])
def test_worked_example_is_up_to_date(script: str) -> None:
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), DOCS / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = (DOCS / "PROTOCOL.md").read_text(encoding="utf-8")
    assert module.BEGIN in doc and module.END in doc
    assert module.rewrite(doc) == doc, f"run: python docs/{script}"
