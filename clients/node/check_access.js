#!/usr/bin/env node
// node check_access.js HOST:PORT CUSTOMER_ID FEATURE [FEATURE ...]
// Calls entitlements.v1 CheckAccess once per feature and prints one JSON line per answer (proto field names).
// All calls go through one client, hence one HTTP/2 connection: create the client once per process and reuse it.
// The token comes from ENTITLEMENTS_TOKEN, else the first of ENTITLEMENTS_API_TOKENS (the server's own variable).
'use strict';
const { CheckAccessResponseSchema, EntitlementsError, createEntitlementsClient, toJson } = require('@entitlements/client');

const USAGE = 'usage: node check_access.js HOST:PORT CUSTOMER_ID FEATURE [FEATURE ...]';

function tokenFrom(env) {
  if (env.ENTITLEMENTS_TOKEN) return env.ENTITLEMENTS_TOKEN;
  return (env.ENTITLEMENTS_API_TOKENS || '').split(',').map((t) => t.trim()).filter(Boolean)[0];
}

/** CheckAccess for each feature over one client; resolves to the answers as proto3 JSON objects. */
async function checkAccess(client, customerId, features) {
  const answers = [];
  for (const feature of features) {
    const decision = await client.checkAccess({ customerId, feature });
    answers.push(toJson(CheckAccessResponseSchema, decision, { useProtoFieldName: true, alwaysEmitImplicit: true }));
  }
  return answers;
}

function describeError(error) {
  const failure = EntitlementsError.from(error);
  return {
    code: failure.code,
    code_name: failure.codeName,
    reason: failure.reason ?? null,
    metadata: failure.metadata,
    message: failure.rawMessage,
  };
}

async function main(argv, env) {
  const [target, customerId, ...features] = argv;
  if (!target || !customerId || features.length === 0) {
    console.error(USAGE);
    return 2;
  }
  let client;
  try {
    client = createEntitlementsClient({ target, token: tokenFrom(env) });
    for (const answer of await checkAccess(client, customerId, features)) console.log(JSON.stringify(answer));
    return 0;
  } catch (error) {
    console.error(JSON.stringify(describeError(error)));
    return 1;
  } finally {
    client?.close();
  }
}

module.exports = { checkAccess, main };

if (require.main === module) {
  main(process.argv.slice(2), process.env).then((code) => {
    process.exitCode = code;
  });
}
