// What the client decides on its own, before or without a server.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ConnectError } from "@connectrpc/connect";

import { Code, EntitlementService, EntitlementsError, createEntitlementsClient } from "../src/index.js";
import { ErrorInfoSchema } from "../src/gen/google/rpc/error_details_pb.js";

test("a token that cannot travel in an HTTP/2 header is refused when the client is created", () => {
  assert.throws(() => createEntitlementsClient({ target: "127.0.0.1:1", token: "tok…en" }), TypeError);
  assert.throws(() => createEntitlementsClient({ target: "127.0.0.1:1", token: "two words" }), TypeError);
});

test("the client has a method for every RPC the contract names, and close()", () => {
  const client = createEntitlementsClient({ target: "127.0.0.1:1" });
  const methods = client as unknown as Record<string, unknown>;

  const missing = EntitlementService.methods.filter((method) => typeof methods[method.localName] !== "function");

  assert.ok(EntitlementService.methods.length >= 5);
  assert.deepEqual(missing.map((method) => method.name), []);
  assert.equal(typeof client.close, "function");
  client.close();
});

test("GetSubscription refuses a selector that names no or several of the oneof's fields", async () => {
  const client = createEntitlementsClient({ target: "127.0.0.1:1" });
  try {
    const both = { customerId: "cus_1", subscriptionId: "sub_1" } as unknown as { customerId: string };
    await assert.rejects(client.getSubscription(both), TypeError);
    await assert.rejects(client.getSubscription({} as { customerId: string }), TypeError);
  } finally {
    client.close();
  }
});

test("a status without ErrorInfo becomes an EntitlementsError without reason or metadata", () => {
  const error = EntitlementsError.from(new ConnectError("missing caller token", Code.Unauthenticated));

  assert.deepEqual(
    [error.code, error.codeName, error.reason, error.metadata, error.rawMessage],
    [Code.Unauthenticated, "UNAUTHENTICATED", undefined, {}, "missing caller token"],
  );
});

test("ErrorInfo details are decoded into reason, domain and metadata", () => {
  const info = { reason: "IDEMPOTENCY_KEY_REUSED", domain: "entitlements.v1", metadata: { key: "k1" } };
  const cause = new ConnectError("reused", Code.FailedPrecondition, undefined, [{ desc: ErrorInfoSchema, value: info }]);

  const error = EntitlementsError.from(cause);

  assert.equal(error.codeName, "FAILED_PRECONDITION");
  assert.deepEqual([error.reason, error.domain, error.metadata], [info.reason, info.domain, info.metadata]);
  assert.equal(error.cause, cause);
});

test("a call to a port where nothing listens fails as UNAVAILABLE", async () => {
  const client = createEntitlementsClient({ target: "127.0.0.1:1", timeoutMs: 2000 });
  try {
    await assert.rejects(client.checkAccess({ customerId: "c", feature: "f" }), (error: unknown) => {
      assert.ok(error instanceof EntitlementsError);
      assert.equal(error.code, Code.Unavailable);
      return true;
    });
  } finally {
    client.close();
  }
});
