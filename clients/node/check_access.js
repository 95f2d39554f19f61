#!/usr/bin/env node
// node check_access.js HOST:PORT CUSTOMER_ID FEATURE  — calls entitlements.v1 CheckAccess and prints JSON.
// The token, if the server wants one, comes from ENTITLEMENTS_API_TOKENS (the first one).
'use strict';
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');

function loadService() {
  const definition = protoLoader.loadSync(path.join(PROTOS, 'entitlements/v1/entitlements.proto'), {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).entitlements.v1.EntitlementService;
}

function checkAccess(target, customerId, feature, token) {
  const Service = loadService();
  const client = new Service(target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (token) metadata.add('authorization', `Bearer ${token}`);
  return new Promise((resolve, reject) => {
    client.CheckAccess({ customer_id: customerId, feature }, metadata, { deadline: Date.now() + 5000 }, (err, res) => {
      client.close();
      if (err) reject(err);
      else resolve(res);
    });
  });
}

module.exports = { checkAccess, loadService };

if (require.main === module) {
  const [target, customerId, feature] = process.argv.slice(2);
  if (!target || !customerId || !feature) {
    console.error('usage: node check_access.js HOST:PORT CUSTOMER_ID FEATURE');
    process.exit(2);
  }
  const token = (process.env.ENTITLEMENTS_API_TOKENS || '').split(',').map((t) => t.trim()).filter(Boolean)[0];
  checkAccess(target, customerId, feature, token)
    .then((res) => console.log(JSON.stringify(res)))
    .catch((err) => {
      console.error(JSON.stringify({ code: err.code, details: err.details }));
      process.exit(1);
    });
}
