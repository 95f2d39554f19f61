"""Generated code is never edited by hand (DESIGN §3): regenerating from protos/ must change nothing, and the
contract passes `buf lint`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, ensure_node_modules

MAKEFILE = REPO_ROOT / "Makefile"
VENV_BIN = Path(sys.executable).parent


def make_variable(name: str) -> str:
    """A `NAME := value` line of the Makefile, so the test regenerates exactly what `make protos` does."""
    found = re.search(rf"^{name}\s*:=\s*(.+?)\s*$", MAKEFILE.read_text(), re.MULTILINE)
    assert found is not None, f"Makefile has no {name} variable"
    return found.group(1)


def generated_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*_pb2*.py*"))
        if path.suffix in (".py", ".pyi")
    }


def test_committed_python_stubs_match_what_make_protos_generates(tmp_path: Path) -> None:
    committed_root = REPO_ROOT / make_variable("GEN_DIR")
    # The very command a developer runs, only writing elsewhere: the test cannot drift from the Makefile.
    result = subprocess.run(
        ["make", "--no-print-directory", "protos", f"GEN_DIR={tmp_path}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"make protos failed:\n{result.stdout}{result.stderr}"

    fresh = generated_files(tmp_path)
    committed = generated_files(committed_root)
    assert fresh, "protoc wrote no stubs"
    drift = {
        "missing": sorted(set(fresh) - set(committed)),
        "no longer generated": sorted(set(committed) - set(fresh)),
        "differing": sorted(name for name in set(fresh) & set(committed) if fresh[name] != committed[name]),
    }
    drift = {what: names for what, names in drift.items() if names}
    assert drift == {}, (
        f"generated stubs under {committed_root.relative_to(REPO_ROOT)} are out of date: run make protos"
    )


@pytest.fixture(scope="session")
def buf() -> Path:
    return ensure_node_modules() / ".bin" / "buf"


def test_contract_passes_buf_lint(buf: Path) -> None:
    result = subprocess.run([str(buf), "lint"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}{result.stderr}"
