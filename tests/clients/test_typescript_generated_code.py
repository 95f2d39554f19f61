"""The generated TypeScript under clients/typescript is never edited by hand (DESIGN §3): regenerating it from protos/
with `make ts-protos` must change nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import REPO_ROOT


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def makefile_value(name: str) -> str:
    """A variable as make expands it, so the test compares against exactly where `make ts-protos` writes."""
    result = make("-s", f"--eval=print-variable: ; @echo $({name})", "print-variable")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_committed_typescript_matches_what_make_ts_protos_generates(tmp_path: Path) -> None:
    committed_root = REPO_ROOT / makefile_value("TS_GEN_DIR")
    fresh_root = tmp_path / "gen"
    # The very command a developer runs, only writing elsewhere: the test cannot drift from the Makefile.
    result = make("ts-protos", f"TS_GEN_DIR={fresh_root}")
    assert result.returncode == 0, f"make ts-protos failed:\n{result.stdout}{result.stderr}"

    fresh = tree(fresh_root)
    committed = tree(committed_root)
    assert "entitlements/v1/entitlements_pb.ts" in fresh, sorted(fresh)
    assert "google/rpc/error_details_pb.ts" in fresh, sorted(fresh)
    drift = {
        "missing": sorted(set(fresh) - set(committed)),
        "no longer generated": sorted(set(committed) - set(fresh)),
        "differing": sorted(name for name in set(fresh) & set(committed) if fresh[name] != committed[name]),
    }
    drift = {what: names for what, names in drift.items() if names}
    assert drift == {}, f"{committed_root.relative_to(REPO_ROOT)} is out of date: run make ts-protos ({drift})"
