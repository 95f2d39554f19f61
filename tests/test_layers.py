"""The layering of DESIGN §11, checked on the imports themselves: domain <- app <- grpc; webhooks and storage
depend on the domain (and storage), never on use cases or transports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

# Which of our packages each layer may import (besides itself and third-party code).
ALLOWED = {
    "service.domain": set(),
    "storage": {"service.domain"},
    "service.app": {"service.domain", "storage"},
    "webhooks": {"service.domain", "storage"},
    "service.grpc": {"service.domain", "service.app", "storage"},
}
OURS = ("service", "storage", "webhooks")


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "service" and len(parts) > 1 and parts[1] in ("domain", "app", "grpc", "dev"):
        return f"service.{parts[1]}"
    if parts[0] == "service":
        return "service"
    return parts[0]


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in OURS}


def modules() -> list[tuple[str, Path]]:
    found = []
    for root in OURS:
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT).with_suffix("")
            found.append((".".join(relative.parts), path))
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_run_one_way(layer: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, path in modules()
        if layer_of(module) == layer
        for target in imports_of(path)
        if layer_of(target) != layer and layer_of(target) not in ALLOWED[layer]
    )
    assert wrong == []


def test_every_module_belongs_to_a_known_layer() -> None:
    known = set(ALLOWED) | {"service", "service.dev"}
    assert {layer_of(module) for module, _ in modules()} <= known


def test_nothing_is_named_like_the_generated_entitlements_package() -> None:
    clashing = [module for module, _ in modules() if module.split(".")[-1] == "entitlements"]
    assert clashing == []
