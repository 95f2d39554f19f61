from __future__ import annotations

from typing import Any

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.catalog import Catalog
from service.dodo import DodoGateway, DodoUnavailable
from tests.conftest import DODO_API_KEY
from tests.fakedodo import FakeDodo
from tests.support import FakeClock, TEAM
from tests.test_change_plan import service_with_gateway, change, change_plan_requests
from storage.engine import Database


class ReadBackFails(DodoGateway):
    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.changed = False

    async def change_plan(self, *a: Any, **k: Any) -> None:
        await super().change_plan(*a, **k)
        self.changed = True

    async def get_subscription(self, subscription_id: str) -> dict[str, Any]:
        if self.changed:
            self.changed = False
            raise DodoUnavailable("lost")
        return await super().get_subscription(subscription_id)


async def test_scratch(database_url: str, db: Database, clock: FakeClock, catalog: Catalog, fake_dodo: FakeDodo) -> None:
    fake_dodo.frozen_now = clock.now
    sub = fake_dodo.add_subscription()
    gw = ReadBackFails(DODO_API_KEY, fake_dodo.base_url, timeout=1.0, read_max_retries=0)
    async with service_with_gateway(database_url, clock, catalog, gw) as stub:
        req = change(sub["subscription_id"], TEAM, key="k1")
        try:
            r = await stub.ChangePlan(req)
            print("first", r)
        except grpc.aio.AioRpcError as e:
            print("first error", e.code(), e.details())
        try:
            r = await stub.ChangePlan(req)
            print("second", r)
        except grpc.aio.AioRpcError as e:
            print("second error", e.code(), e.details())
    print(len(change_plan_requests(fake_dodo)))
