"""A development webhook secret for `make run`, kept in .data/ so `service.dev.send_webhook` signs with the same
one."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

KEY_FILE = Path(".data") / "webhook-key"


def dev_key(path: Path = KEY_FILE) -> str:
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


if __name__ == "__main__":
    print(dev_key())
