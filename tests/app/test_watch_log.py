"""The watch log under concurrent writers (DESIGN §13): every committed change is numbered once, in an order
consistent with commit order, and a reader tailing `position > cursor` while it grows sees each exactly once.

The writers hold their transactions open for a random while after writing, so that they commit out of the order in
which they wrote (and in which a plain sequence would have numbered them): a reader of a plain sequence would pass
a number whose transaction had not committed yet, and never see it.
"""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

from service.app.watch_log import WatchLog
from service.domain.catalog import Catalog
from service.domain.watch_rules import WatchEvent, WatchKind
from storage.engine import Database
from storage.repositories.watch import WatchRepository
from tests.support import FakeClock

WRITERS = 16
COMMITS_EACH = 25


async def tail(db: Database, stop: asyncio.Event, seen: list[WatchEvent]) -> None:
    last = 0
    while True:
        async with db.connection() as connection:
            page = await WatchRepository(connection).read(last, 2**63 - 1, None, 500)
        seen.extend(page)
        if page:
            last = page[-1].position
        elif stop.is_set():
            return
        else:
            await asyncio.sleep(0.005)


async def test_concurrent_writers_two_sequencers_and_a_tailing_reader_see_every_change_once_in_commit_order(
    db: Database, database_url: str, catalog: Catalog, clock: FakeClock
) -> None:
    async with db.tx() as connection:
        await connection.execute(
            "INSERT INTO credit_balances (customer_id, credit, balance) "
            "SELECT 'cus_' || n, 'ai_tokens', 0 FROM generate_series(0, $1) AS n",
            WRITERS,
        )
    replica = Database.from_url(database_url, pool_size=6)
    logs = [WatchLog(db, catalog, clock), WatchLog(replica, catalog, clock)]
    await logs[0].sequence()  # the accounts' creation
    async with db.connection() as connection:
        start = (await WatchRepository(connection).head()).position
    writing = asyncio.Event()
    done = asyncio.Event()
    rng = random.Random(7)

    async def writer(index: int) -> None:
        for _ in range(COMMITS_EACH):
            async with db.tx() as connection:
                # Its own account, then the shared hot one (cus_WRITERS): the row lock orders the shared writes.
                await connection.execute(
                    "UPDATE credit_balances SET balance = balance + 1 WHERE customer_id = $1", f"cus_{index}"
                )
                await connection.execute("SELECT pg_sleep($1)", rng.random() * 0.01)
                await connection.execute(
                    "UPDATE credit_balances SET balance = balance + 1 WHERE customer_id = $1", f"cus_{WRITERS}"
                )
                await connection.execute("SELECT pg_sleep($1)", rng.random() * 0.01)

    async def sequencer(log: WatchLog) -> None:
        while not done.is_set():
            await log.sequence()
            await asyncio.sleep(0.002)

    async def rolled_back() -> None:
        for _ in range(10):
            try:
                async with db.tx() as connection:
                    await connection.execute(
                        "UPDATE credit_balances SET balance = balance - 1000 WHERE customer_id = 'cus_0'"
                    )
                    raise RuntimeError("rolled back")
            except RuntimeError:
                pass

    seen: list[WatchEvent] = []
    try:
        sequencers = [asyncio.create_task(sequencer(log)) for log in logs]
        reader = asyncio.create_task(tail(db, done, seen))
        writing.set()
        await asyncio.gather(*(writer(i) for i in range(WRITERS)), rolled_back())
        await logs[1].sequence()
        done.set()
        await asyncio.gather(*sequencers, reader)
    finally:
        await replica.close()

    positions = [event.position for event in seen if event.position > start]
    total = WRITERS * COMMITS_EACH * 2
    assert positions == list(range(start + 1, start + total + 1)), "an event was skipped, repeated or misordered"
    changed = [event for event in seen if event.position > start]
    assert {event.kind for event in changed} == {WatchKind.CREDITS_CHANGED}
    # Conflicting writes appear in commit order: the shared account counts up one by one.
    hot = [event.balance for event in changed if event.customer_id == f"cus_{WRITERS}"]
    assert hot == [Decimal(n) for n in range(1, WRITERS * COMMITS_EACH + 1)]
    for index in range(WRITERS):
        own = [event.balance for event in changed if event.customer_id == f"cus_{index}"]
        assert own == [Decimal(n) for n in range(1, COMMITS_EACH + 1)]
    # Nothing is left waiting, and nothing of the rolled-back transactions was logged.
    async with db.connection() as connection:
        assert await connection.fetchval("SELECT count(*) FROM watch_pending") == 0
        assert await connection.fetchval("SELECT count(*) FROM watch_events WHERE balance < 0") == 0


async def test_a_change_committed_with_no_sequencer_running_is_logged_by_the_next_one(
    db: Database, catalog: Catalog, clock: FakeClock
) -> None:
    """The triggers write the pending row in the changing transaction; a process that dies before sequencing loses
    nothing (here: no sequencer at all until the change is committed)."""
    async with db.tx() as connection:
        await connection.execute(
            "INSERT INTO credit_balances (customer_id, credit, balance) VALUES ('c', 'ai_tokens', 5)"
        )
    async with db.connection() as connection:
        assert await connection.fetchval("SELECT count(*) FROM watch_pending") == 1
    assert await WatchLog(db, catalog, clock).sequence() == 1
    async with db.connection() as connection:
        events = await WatchRepository(connection).read(0, 2**63 - 1, None, 10)
    assert [(e.kind, e.customer_id, e.balance) for e in events] == [(WatchKind.CREDITS_CHANGED, "c", Decimal(5))]
