"""The contract only grows (DESIGN §4): `make breaking`, part of `make lint`, runs `buf breaking` against the last
released contract, which is the newest `contract-v*` tag reachable from HEAD or, before any release, the commit that
first added the proto. Each case copies this repo's buf.yaml and protos/ into a scratch git repository and runs the
repo's own Makefile there, so what is tested is the rule `make lint` applies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.clients.nodejs import install_node_packages
from tests.support import NODE_DIR, REPO_ROOT

MAKEFILE = REPO_ROOT / "Makefile"
PROTO = Path("protos/entitlements/v1/entitlements.proto")
GIT_IDENTITY = ("-c", "user.name=contract test", "-c", "user.email=contract@test.invalid", "-c", "commit.gpgsign=false")


def make_breaking(cwd: Path) -> subprocess.CompletedProcess[str]:
    # NODE_DIR points at this repo's installed buf; everything else (git history, buf.yaml, protos/) is cwd's.
    return subprocess.run(
        ["make", "--no-print-directory", "-f", str(MAKEFILE), "breaking", f"NODE_DIR={NODE_DIR}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "core.hooksPath=/dev/null", *GIT_IDENTITY, *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def edit(repo: Path, old: str, new: str) -> None:
    path = repo / PROTO
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in the proto exactly once"
    path.write_text(text.replace(old, new))


ADD_A_FIELD = ("message CheckAccessRequest {\n", "message CheckAccessRequest {\n  string added_for_the_test = 99;\n")
REMOVE_A_FIELD = ("  string feature = 2;\n", "")
RENAME_AN_RPC = ("rpc CheckAccess(CheckAccessRequest)", "rpc CheckAccessNow(CheckAccessRequest)")


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """A repository whose first commit publishes this repo's contract as it is now."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "buf.yaml", repo / "buf.yaml")
    shutil.copytree(REPO_ROOT / "protos", repo / "protos")
    git(repo, "init", "-q")
    commit(repo, "publish the contract")
    return repo


@pytest.fixture(scope="module", autouse=True)
def buf_installed() -> None:
    install_node_packages()


def test_this_repos_contract_is_compatible_with_its_last_released_one() -> None:
    result = make_breaking(REPO_ROOT)

    assert result.returncode == 0, f"buf breaking failed:\n{result.stdout}{result.stderr}"
    assert "buf breaking --against .git#ref=" in result.stdout


def test_adding_a_field_after_publishing_passes(published: Path) -> None:
    edit(published, *ADD_A_FIELD)
    commit(published, "add a field")

    result = make_breaking(published)

    assert result.returncode == 0, result.stdout + result.stderr


def test_removing_a_field_of_the_published_contract_fails(published: Path) -> None:
    edit(published, *ADD_A_FIELD)
    commit(published, "an additive change in between does not move the baseline")
    edit(published, *REMOVE_A_FIELD)

    result = make_breaking(published)

    assert result.returncode != 0
    assert 'Previously present field "2" with name "feature" on message "CheckAccessRequest" was deleted' in (
        result.stdout + result.stderr
    )


def test_renaming_an_rpc_of_the_published_contract_fails(published: Path) -> None:
    edit(published, *RENAME_AN_RPC)
    commit(published, "rename an RPC")

    result = make_breaking(published)

    assert result.returncode != 0
    assert 'Previously present RPC "CheckAccess" on service "EntitlementService" was deleted' in (
        result.stdout + result.stderr
    )


def test_a_contract_tag_is_the_baseline_from_then_on(published: Path) -> None:
    edit(published, *REMOVE_A_FIELD)
    released = commit(published, "drop a field before the first release")
    git(published, "tag", "contract-v1", released)
    edit(published, *ADD_A_FIELD)
    commit(published, "add a field after the release")

    tagged = make_breaking(published)
    git(published, "tag", "-d", "contract-v1")
    untagged = make_breaking(published)

    assert tagged.returncode == 0, tagged.stdout + tagged.stderr
    assert "--against .git#ref=contract-v1" in tagged.stdout
    assert untagged.returncode != 0, "without the tag the field's removal since first publication is breaking"


def test_without_history_there_is_no_baseline_and_the_check_fails(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos")

    result = make_breaking(tmp_path)

    assert result.returncode != 0
    assert "no baseline" in result.stderr
