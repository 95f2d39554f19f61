"""Alembic migrations on a database of their own: every revision upgrades and downgrades cleanly, and head is
exactly what storage.models describes (so a model change without a migration fails here)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from storage.engine import make_engine, plain_url
from storage.migrate import alembic_config, downgrade, upgrade
from storage.models import Base

MODEL_TABLES = frozenset(Base.metadata.tables)


async def admin_execute(server_url: str, sql: str) -> None:
    connection = await asyncpg.connect(plain_url(server_url))
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture
async def fresh_database_url(server_url: str) -> AsyncIterator[str]:
    """An empty database created for one test and dropped after it."""
    name = f"entitlements_migrations_{uuid.uuid4().hex[:12]}"
    await admin_execute(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(plain_url(server_url))._replace(path=f"/{name}"))
    finally:
        await admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def public_relations(url: str) -> dict[str, str]:
    """Every table, index, sequence and view in the public schema, every column (table.column → its type) and
    every type defined there (name → kind), leaving out Alembic's own bookkeeping table."""
    connection = await asyncpg.connect(plain_url(url))
    try:
        rows = await connection.fetch(
            """
            SELECT c.relname AS name, c.relkind::text AS kind
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public'
            UNION ALL
            SELECT t.typname, 'type' FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'c') AND t.typrelid = 0
            UNION ALL
            SELECT table_name || '.' || column_name, data_type FROM information_schema.columns
            WHERE table_schema = 'public'
            """
        )
        return {row["name"]: row["kind"] for row in rows if "alembic_version" not in row["name"]}
    finally:
        await connection.close()


async def current_revisions(url: str) -> set[str]:
    connection = await asyncpg.connect(plain_url(url))
    try:
        return {row["version_num"] for row in await connection.fetch("SELECT version_num FROM alembic_version")}
    finally:
        await connection.close()


def revisions_in_order(url: str) -> list[tuple[str, str]]:
    """(revision, what downgrading it leads to) from the first migration to head."""
    script = ScriptDirectory.from_config(alembic_config(url))
    ordered = list(reversed(list(script.walk_revisions("base", "heads"))))
    steps = []
    for revision in ordered:
        down = revision.down_revision
        assert down is None or isinstance(down, str), f"{revision.revision}: merge revisions are not expected"
        steps.append((revision.revision, down or "base"))
    return steps


async def schema_differences(url: str) -> list[Any]:
    engine = make_engine(url, pool_size=1)
    try:
        async with engine.connect() as connection:

            def compare(sync_connection: Connection) -> list[Any]:
                context = MigrationContext.configure(
                    sync_connection, opts={"compare_type": True, "compare_server_default": True}
                )
                return list(compare_metadata(context, Base.metadata))

            return await connection.run_sync(compare)
    finally:
        await engine.dispose()


async def test_migrations_upgrade_to_head_downgrade_to_base_and_upgrade_again(fresh_database_url: str) -> None:
    url = fresh_database_url
    script = ScriptDirectory.from_config(alembic_config(url))

    await asyncio.to_thread(upgrade, url)
    assert await current_revisions(url) == set(script.get_heads())
    assert set(await public_relations(url)) >= MODEL_TABLES

    await asyncio.to_thread(downgrade, url, "base")
    assert await current_revisions(url) == set()
    assert await public_relations(url) == {}, "downgrading to base must drop every table, index, sequence and type"

    await asyncio.to_thread(upgrade, url)
    assert await current_revisions(url) == set(script.get_heads())
    assert await schema_differences(url) == []


async def test_each_migration_downgrades_and_reapplies_cleanly(fresh_database_url: str) -> None:
    """The stairway: up one revision, down one, up again, so every downgrade() undoes exactly its upgrade()."""
    url = fresh_database_url
    for revision, previous in revisions_in_order(url):
        before = await public_relations(url)
        await asyncio.to_thread(upgrade, url, revision)
        after = await public_relations(url)
        assert after != before, f"{revision}: upgrade changed nothing"

        await asyncio.to_thread(downgrade, url, previous)
        assert await current_revisions(url) == (set() if previous == "base" else {previous})
        assert await public_relations(url) == before, f"{revision}: downgrade() does not undo upgrade()"

        await asyncio.to_thread(upgrade, url, revision)
        assert await public_relations(url) == after, f"{revision}: upgrading again gives a different schema"


async def test_models_match_the_migrations_at_head(fresh_database_url: str) -> None:
    await asyncio.to_thread(upgrade, fresh_database_url)

    differences = await schema_differences(fresh_database_url)

    assert differences == [], "storage.models and the migrations disagree: write a migration for the model change"
