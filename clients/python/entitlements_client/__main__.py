"""`python -m entitlements_client`: the CLI (see entitlements_client.cli), also installed as `entitlements`."""

from __future__ import annotations

import sys

from entitlements_client.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m entitlements_client"))
