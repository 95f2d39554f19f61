// Every RPC of entitlements.v1 through the typed client, against a live server: tests/clients/test_typescript_client.py
// starts the real service, delivers the `subscription_active` webhook (the Pro plan: `dashboard`, 10000 `ai_tokens`)
// and runs this file with the target, the token and the ids of that scenario in the environment.
// One client serves every call, as in production; the Python side checks that they shared one connection.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  AccessReason,
  Code,
  ERROR_DOMAIN,
  EntitlementEventKind,
  EntitlementsError,
  FeatureKind,
  createEntitlementsClient,
} from "../src/index.js";
import type { EntitlementEvent, EntitlementsClient } from "../src/index.js";

function env(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: this suite needs a live server (tests/clients/test_typescript_client.py)`);
  }
  return value;
}

async function rejection(promise: Promise<unknown>): Promise<EntitlementsError> {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof EntitlementsError, `expected an EntitlementsError, got ${String(error)}`);
    return error;
  }
  assert.fail("the call succeeded");
}

describe("entitlements.v1 over one client", () => {
  const customerId = env("LIVE_CUSTOMER_ID");
  const subscriptionId = env("LIVE_SUBSCRIPTION_ID");
  let client: EntitlementsClient;

  before(() => {
    client = createEntitlementsClient({ target: env("ENTITLEMENTS_TARGET"), token: env("ENTITLEMENTS_TOKEN") });
  });

  after(() => client.close());

  test("CheckAccess grants a boolean feature of the active plan", async () => {
    const decision = await client.checkAccess({ customerId, feature: "dashboard" });

    assert.equal(decision.allowed, true);
    assert.equal(decision.reason, AccessReason.ACTIVE);
    assert.equal(decision.kind, FeatureKind.BOOLEAN);
    assert.equal(decision.status, "active");
    assert.equal(decision.subscriptionId, subscriptionId);
  });

  test("GetSubscription finds the same subscription by customer and by id, with its plan and balances", async () => {
    const byCustomer = await client.getSubscription({ customerId });
    const byId = await client.getSubscription({ subscriptionId });

    const subscription = byCustomer.subscription;
    assert.ok(subscription);
    assert.equal(subscription.subscriptionId, subscriptionId);
    assert.equal(subscription.customerId, customerId);
    assert.equal(subscription.status, "active");
    assert.equal(subscription.planName, "Pro");
    assert.equal(subscription.access?.allowed, true);
    assert.ok(subscription.features.includes("dashboard"), subscription.features.join(","));
    assert.equal(subscription.credits["ai_tokens"], "10000");
    assert.equal(typeof subscription.recurringAmount, "bigint");
    assert.ok(subscription.currentPeriodEnd, "the period end is a Timestamp");
    assert.deepEqual(byId.subscription, subscription);
  });

  test("ConsumeCredits burns credits once per idempotency key", async () => {
    const request = { customerId, credit: "ai_tokens", amount: "25", idempotencyKey: "ts-order-1" };

    const spent = await client.consumeCredits({ ...request, description: "chat", metadata: { model: "m1" } });
    const again = await client.consumeCredits({ ...request, description: "chat", metadata: { model: "m1" } });

    assert.deepEqual([spent.balanceAfter, spent.overageAfter, spent.replayed], ["9975", "0", false]);
    assert.ok(spent.entryId);
    assert.deepEqual([again.entryId, again.balanceAfter, again.replayed], [spent.entryId, "9975", true]);
  });

  test("ListCreditLedger pages the ledger newest first", async () => {
    const page = await client.listCreditLedger({ customerId, credit: "ai_tokens", pageSize: 10 });

    assert.deepEqual(
      page.entries.map((entry) => [entry.kind, entry.amount, entry.balanceAfter]),
      [
        ["consumption", "-25", "9975"],
        ["plan_grant", "10000", "10000"],
      ],
    );
    assert.equal(page.entries[0]?.metadata["model"], "m1");
    assert.equal(page.nextPageToken, "");
  });

  test("ChangePlan previews an upgrade and prices it", async () => {
    const preview = await client.changePlan({
      subscriptionId: env("LIVE_PREVIEW_SUBSCRIPTION_ID"),
      productId: env("LIVE_PREVIEW_PRODUCT_ID"),
      quantity: 2,
      preview: true,
    });

    assert.equal(preview.subscription?.productId, env("LIVE_PREVIEW_PRODUCT_ID"));
    assert.equal(preview.subscription?.quantity, 2);
    assert.equal(preview.currency, "USD");
    assert.equal(preview.replayed, false);
  });

  test("an empty customer_id is INVALID_ARGUMENT with ErrorInfo FIELD_INVALID naming the field", async () => {
    const error = await rejection(client.checkAccess({ customerId: "", feature: "dashboard" }));

    assert.equal(error.code, Code.InvalidArgument);
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(error.reason, "FIELD_INVALID");
    assert.equal(error.domain, ERROR_DOMAIN);
    assert.deepEqual(error.metadata, { field: "customer_id" });
    assert.match(error.rawMessage, /customer_id/);
  });

  test("consuming more than the balance is RESOURCE_EXHAUSTED with INSUFFICIENT_CREDITS and the balance", async () => {
    const { balance } = await client.checkAccess({ customerId, feature: "ai_tokens" });

    const error = await rejection(
      client.consumeCredits({ customerId, credit: "ai_tokens", amount: "1000000", idempotencyKey: "ts-too-much" }),
    );

    assert.equal(error.code, Code.ResourceExhausted);
    assert.equal(error.reason, "INSUFFICIENT_CREDITS");
    assert.equal(error.metadata["balance"], balance);
    const after = await client.checkAccess({ customerId, feature: "ai_tokens" });
    assert.equal(after.balance, balance, "a refused consumption changes nothing");
  });

  test("watch() sees a change live, then replays it from the cursor before it", async () => {
    const watch = client.watch({ customerIds: [customerId], heartbeats: true });
    const events: EntitlementEvent[] = [];
    let caughtUp = "";
    for await (const event of watch) {
      if (event.kind === EntitlementEventKind.HEARTBEAT) {
        if (!caughtUp) {
          caughtUp = event.cursor;
          assert.equal(watch.live, true);
          await client.consumeCredits({ customerId, credit: "ai_tokens", amount: "1", idempotencyKey: "ts-watch-1" });
        }
        continue;
      }
      events.push(event);
      if (event.kind === EntitlementEventKind.CREDITS_CHANGED) break;
    }
    const change = events.at(-1);
    assert.ok(change);
    assert.equal(change.customerId, customerId);
    assert.equal(change.credit, "ai_tokens");
    assert.ok(change.cursor);
    assert.equal(watch.cursor, change.cursor);

    const again = client.watch({ customerIds: [customerId], afterCursor: caughtUp });
    const replayed: EntitlementEvent[] = [];
    for await (const event of again) {
      replayed.push(event);
      if (replayed.length === events.length) break;
    }
    assert.deepEqual(
      replayed.map((event) => event.cursor),
      events.map((event) => event.cursor),
    );
  });

  test("watch() from a cursor the server never issued throws INVALID_ARGUMENT naming after_cursor", async () => {
    const watch = client.watch({ afterCursor: "not-a-cursor" });
    const error = await rejection(
      (async () => {
        for await (const _ of watch) assert.fail("no event expected");
      })(),
    );

    assert.equal(error.code, Code.InvalidArgument);
    assert.equal(error.metadata["field"], "after_cursor");
  });
});
