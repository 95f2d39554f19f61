"""The Dockerfile and compose file cannot be built here (no Docker engine on these machines); what can be checked
without one is checked: everything they copy exists, every variable they set is one the service reads, and the
commands they run are the service's own."""

from __future__ import annotations

import re

from service.settings import Settings
from tests.support import REPO_ROOT

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
COMPOSE = (REPO_ROOT / "compose.yaml").read_text()
OURS = {field.alias for field in Settings.model_fields.values() if field.alias}


def test_everything_the_dockerfile_copies_exists_and_it_serves_the_service() -> None:
    for source in re.findall(r"^COPY (\S+) ", DOCKERFILE, re.MULTILINE):
        assert (REPO_ROOT / source).exists(), source
    assert 'CMD ["python", "-m", "service", "serve"]' in DOCKERFILE
    assert "/readyz" in DOCKERFILE


def test_every_variable_the_images_get_is_one_the_service_reads() -> None:
    dockerfile_vars = set(re.findall(r"\b(ENTITLEMENTS_[A-Z_]+)=", DOCKERFILE))
    compose_vars = set(re.findall(r"^\s+((?:ENTITLEMENTS|DODO_PAYMENTS|DATABASE)_?[A-Z_]*):", COMPOSE, re.MULTILINE))
    assert dockerfile_vars | compose_vars
    assert (dockerfile_vars | compose_vars) - OURS == set()


def test_compose_migrates_once_before_the_service_starts() -> None:
    assert 'command: ["python", "-m", "service", "migrate"]' in COMPOSE
    assert "condition: service_completed_successfully" in COMPOSE
    assert "condition: service_healthy" in COMPOSE
