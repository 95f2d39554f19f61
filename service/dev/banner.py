"""What `make run` prints before serving: where things listen and a call to paste."""

from __future__ import annotations

from service.settings import Settings


def banner(settings: Settings) -> str:
    grpc_addr, http_addr = settings.grpc_addr, settings.http_addr
    return f"""
  Entitlements service
  --------------------
  gRPC     {grpc_addr}   (entitlements.v1.EntitlementService, grpc.health.v1.Health, reflection)
  HTTP     http://{http_addr}   (POST /webhooks/dodo, GET /healthz, GET /readyz)
  catalog  {settings.catalog_path}

  Drive the lifecycle by hand (another terminal), as Dodo's "send test event" does:
    .venv/bin/python -m service.dev.send_webhook tests/fixtures/dodo/subscription_active.json --url http://{http_addr}/webhooks/dodo

  Then ask (Python):
    .venv/bin/python -m entitlements_client --target {grpc_addr} check-access cus_5Hq2LrT9vXcW3mK8pZ1dE dashboard

  Or (Node):
    node clients/node/check_access.js {grpc_addr} cus_5Hq2LrT9vXcW3mK8pZ1dE dashboard
"""
