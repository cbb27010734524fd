"""docs/ARCHITECTURE.md follows the tree: every module it names exists (and every name after a
module is defined in it), and every module of oscar, oscar_io and the roles is named there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = (
    "oscar",
    "oscar_io",
    "authz_server",
    "producer",
    "consumer",
    "proxy",
    "demo",
    "bench",
    "fuzz",
)
#: Whose every module the page must name (the layers below demo, bench and fuzz).
COVERED = PACKAGES[:6]
NAME = re.compile(rf"`((?:{'|'.join(PACKAGES)})(?:\.\w+)*)`")


def _module_file(dotted: str) -> Path | None:
    path = ROOT.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_names(source: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _named() -> set[str]:
    return set(NAME.findall(DOC.read_text()))


def test_every_module_named_exists() -> None:
    missing = []
    for dotted in sorted(_named()):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            source = _module_file(".".join(parts[:cut]))
            if source is not None:
                break
        else:
            missing.append(dotted)
            continue
        rest = parts[cut:]
        if rest and rest[0] not in _top_level_names(source):
            missing.append(dotted)
    assert not missing, f"docs/ARCHITECTURE.md names what is not in the tree: {missing}"


def test_every_module_of_the_lower_layers_is_named() -> None:
    named = _named()
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for package in COVERED
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__main__.py"
    }
    unnamed = sorted(m for m in modules if m not in named and m not in COVERED)
    assert not unnamed, f"docs/ARCHITECTURE.md does not say where these live: {unnamed}"
