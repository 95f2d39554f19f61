"""Where credits come from besides a plan's per-period grant (applied with its subscription snapshot, in
service/app/snapshots.py): Dodo's credit ledger webhooks.

It runs inside the caller's transaction (a webhook delivery), so a ledger entry commits together with the event
that carried it or not at all.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from service.domain import credit_rules as credits
from service.domain.catalog import Catalog
from service.domain.dodo_payloads import DodoLedgerEntry
from storage.engine import Connection
from storage.repositories.credit_mirror import ECHO_SLACK, MirrorRepository
from storage.repositories.credits import CreditRepository

log = logging.getLogger("entitlements.credits")

# The transaction types Dodo may give the echo of an API debit ("" when an entry names none).
_API_DEBIT_TYPES = frozenset({"credit_deducted", "manual_adjustment", ""})


async def apply_dodo_ledger_entry(connection: Connection, catalog: Catalog, entry: DodoLedgerEntry) -> str:
    """Mirror one Dodo credit ledger entry as a signed delta, exactly once per entry id. Returns the inbox status."""
    definition = catalog.credit_for_entitlement(entry.credit_entitlement_id)
    if definition is None:
        return "recorded"
    repository = CreditRepository(connection)
    # The account lock serializes deliveries of one credit, so the seen-check below cannot race.
    account = await repository.lock(entry.customer_id, definition.key)
    if await repository.has_dodo_entry(entry.entry_id):
        return "duplicate_entry"
    mirror = MirrorRepository(connection)
    if not entry.is_credit and await _is_mirror_echo(mirror, definition.key, entry):
        return "mirror_echo"
    if entry.is_credit and await mirror.retry_debts(entry.customer_id, definition.key):
        log.info("credit_mirror.debts_retried", extra={"customer_id": entry.customer_id, "credit": definition.key})
    account, expired = credits.expire(account, entry.created_at)
    kind = f"dodo_{entry.transaction_type or 'ledger'}"
    if entry.is_credit:
        account, written = credits.credit(
            account, entry.amount, grant_id=f"dodo:{entry.entry_id}", expires_at=None, source=entry.entry_id, kind=kind
        )
    else:
        account, written = credits.debit(account, entry.amount, source=entry.entry_id, kind=kind)
    written = replace(written, dodo_entry_id=entry.entry_id, description=entry.description)
    await repository.save([account], [*expired, written])
    return "applied"


async def _is_mirror_echo(mirror: MirrorRepository, credit: str, entry: DodoLedgerEntry) -> bool:
    """Whether a Dodo debit is the echo of one of our mirror batches (service/app/credit_mirror.py), already in
    our balance as the consumptions it sums.

    The rule: its entry id is a batch's stored Dodo id (the 201 came first) -> echo. Else, when a batch of the
    same (customer, credit) still waits for its id (`sending`: the POST is in flight; `unknown`: a 409 not yet
    resolved), the oldest such batch of exactly the entry's amount, closed no later than shortly after the
    entry's creation, takes the entry as its echo (the webhook beat the 201) and stores its id; the sender's
    201 then confirms the same id (a different id is logged as `credit_mirror.echo_mismatch`). Anything else is
    a foreign debit (a dashboard adjustment) and is applied. Only entry types an API debit's echo may carry
    (`credit_deducted`, `manual_adjustment`: DODO_WAVE2 §2.3) are matched by amount."""
    if await mirror.by_entry_id(entry.entry_id) is not None:
        log.info("credit_mirror.echo", extra={"customer_id": entry.customer_id, "dodo_entry_id": entry.entry_id})
        return True
    if entry.transaction_type not in _API_DEBIT_TYPES:
        return False  # an expiry, a forfeited rollover, an overage reset: Dodo's own doing, never our debit
    waiting = await mirror.claim_echo(
        entry.customer_id, credit, entry.amount, entry.created_at, slack_seconds=ECHO_SLACK.total_seconds()
    )
    if waiting is None:
        return False
    await mirror.attach_echo(waiting.batch_id, entry.entry_id, resolved=waiting.status == "unknown")
    log.info(
        "credit_mirror.echo_before_answer",
        extra={"customer_id": entry.customer_id, "dodo_entry_id": entry.entry_id, "batch_id": waiting.batch_id},
    )
    return True
