"""TLS and mutual TLS on the gRPC port (DESIGN §14), with a CA, server and client certificates generated here: the
real server started with ENTITLEMENTS_TLS_* answers TLS clients that trust the CA, nothing in plaintext, and with
a client CA only clients holding a certificate that CA signed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from entitlements.v1 import entitlements_pb2 as pb
from entitlements.v1 import entitlements_pb2_grpc as pb_grpc

from service.domain.catalog import Catalog
from service.domain.errors import ConfigurationError
from service.server import Running, start
from storage.engine import Database
from tests.pki import Issued, Pki, make_pki
from tests.support import API_TOKEN, FakeClock, make_settings

AUTH = (("authorization", f"Bearer {API_TOKEN}"),)
CHECK = pb.CheckAccessRequest(customer_id="cus_0Zz9Yy8Xx7Ww6Vv5Uu4Tt", feature="dashboard")
# A refused handshake fails the call at once; the bound only keeps a regression from hanging the suite.
CALL_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@asynccontextmanager
async def serving(database_url: str, clock: FakeClock, catalog: Catalog, **env: str) -> AsyncIterator[Running]:
    running = await start(
        make_settings(database_url, **env),
        clock=clock,
        catalog=catalog,
        db=Database.from_url(database_url, pool_size=4),
    )
    try:
        yield running
    finally:
        await running.stop(0)


def tls_env(pki: Pki, *, mutual: bool = False) -> dict[str, str]:
    env = {"ENTITLEMENTS_TLS_CERT": str(pki.server.cert_path), "ENTITLEMENTS_TLS_KEY": str(pki.server.key_path)}
    if mutual:
        env["ENTITLEMENTS_TLS_CLIENT_CA"] = str(pki.ca.cert_path)
    return env


async def check_access(channel: grpc.aio.Channel) -> pb.CheckAccessResponse:
    stub = pb_grpc.EntitlementServiceStub(channel)
    response: pb.CheckAccessResponse = await stub.CheckAccess(CHECK, metadata=AUTH, timeout=CALL_TIMEOUT)
    return response


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await check_access(channel)
    return caught.value.code()


def tls_channel(port: int, pki: Pki, client: Issued | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


# ------------------------------------------------------------------------------------------------------- TLS


async def test_with_a_certificate_and_key_grpc_speaks_tls_to_clients_that_trust_the_ca_and_not_plaintext(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, pki: Pki
) -> None:
    async with serving(database_url, clock, catalog, **tls_env(pki)) as running:
        async with tls_channel(running.grpc_port, pki) as channel:
            answered = await check_access(channel)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as plaintext:
            plaintext_code = await refused(plaintext)

    assert answered.reason == pb.ACCESS_REASON_NO_SUBSCRIPTION
    assert plaintext_code == grpc.StatusCode.UNAVAILABLE


async def test_a_tls_client_that_does_not_trust_the_servers_ca_is_refused(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, pki: Pki
) -> None:
    async with serving(database_url, clock, catalog, **tls_env(pki)) as running:
        untrusting = grpc.ssl_channel_credentials(root_certificates=pki.stranger.cert_pem)
        async with grpc.aio.secure_channel(f"127.0.0.1:{running.grpc_port}", untrusting) as channel:
            code = await refused(channel)

    assert code == grpc.StatusCode.UNAVAILABLE


async def test_without_tls_settings_grpc_stays_plaintext(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog
) -> None:
    async with (
        serving(database_url, clock, catalog) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel,
    ):
        answered = await check_access(channel)

    assert answered.reason == pb.ACCESS_REASON_NO_SUBSCRIPTION


# ------------------------------------------------------------------------------------------------------ mTLS


async def test_with_a_client_ca_only_clients_with_a_certificate_it_signed_are_answered(
    database_url: str, db: Database, clock: FakeClock, catalog: Catalog, pki: Pki
) -> None:
    async with serving(database_url, clock, catalog, **tls_env(pki, mutual=True)) as running:
        port = running.grpc_port
        async with tls_channel(port, pki, client=pki.client) as channel:
            answered = await check_access(channel)
        async with tls_channel(port, pki) as channel:
            without_certificate = await refused(channel)
        async with tls_channel(port, pki, client=pki.stranger) as channel:
            signed_by_another_ca = await refused(channel)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            plaintext = await refused(channel)

    assert answered.reason == pb.ACCESS_REASON_NO_SUBSCRIPTION
    assert (without_certificate, signed_by_another_ca, plaintext) == (grpc.StatusCode.UNAVAILABLE,) * 3


# ----------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"ENTITLEMENTS_TLS_CERT": "{server_cert}"},
            "ENTITLEMENTS_TLS_CERT and ENTITLEMENTS_TLS_KEY must be set together",
        ),
        (
            {"ENTITLEMENTS_TLS_KEY": "{server_key}"},
            "ENTITLEMENTS_TLS_CERT and ENTITLEMENTS_TLS_KEY must be set together",
        ),
        ({"ENTITLEMENTS_TLS_CLIENT_CA": "{ca_cert}"}, "ENTITLEMENTS_TLS_CLIENT_CA needs ENTITLEMENTS_TLS_CERT"),
        (
            {"ENTITLEMENTS_TLS_CERT": "{missing}", "ENTITLEMENTS_TLS_KEY": "{server_key}"},
            "ENTITLEMENTS_TLS_CERT: cannot read {missing}",
        ),
        (
            {"ENTITLEMENTS_TLS_CERT": "{server_cert}", "ENTITLEMENTS_TLS_KEY": "{folder}"},
            "ENTITLEMENTS_TLS_KEY: cannot read {folder}",
        ),
        (
            {
                "ENTITLEMENTS_TLS_CERT": "{server_cert}",
                "ENTITLEMENTS_TLS_KEY": "{server_key}",
                "ENTITLEMENTS_TLS_CLIENT_CA": "{not_pem}",
            },
            "ENTITLEMENTS_TLS_CLIENT_CA: {not_pem} is not a PEM file",
        ),
        (
            {"ENTITLEMENTS_TLS_CERT": "{server_cert}", "ENTITLEMENTS_TLS_KEY": "{ca_key}"},
            "ENTITLEMENTS_TLS_KEY is not the private key of ENTITLEMENTS_TLS_CERT",
        ),
    ],
    ids=[
        "cert-without-key",
        "key-without-cert",
        "client-ca-without-cert",
        "missing-cert",
        "key-is-a-folder",
        "not-pem",
        "key-of-another-certificate",
    ],
)
async def test_incomplete_or_unreadable_tls_settings_stop_the_start_with_a_clear_message(
    database_url: str,
    db: Database,
    clock: FakeClock,
    catalog: Catalog,
    pki: Pki,
    tmp_path: Path,
    env: dict[str, str],
    says: str,
) -> None:
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("this is not a certificate\n")
    paths = {
        "server_cert": str(pki.server.cert_path),
        "server_key": str(pki.server.key_path),
        "ca_cert": str(pki.ca.cert_path),
        "ca_key": str(pki.ca.key_path),
        "missing": str(tmp_path / "nowhere.crt"),
        "folder": str(tmp_path),
        "not_pem": str(not_pem),
    }

    with pytest.raises(ConfigurationError) as stopped:
        async with serving(
            database_url, clock, catalog, **{name: value.format(**paths) for name, value in env.items()}
        ):
            pass  # pragma: no cover  # start() raises

    message = str(stopped.value)
    assert says.format(**paths) in message
    for key in (pki.server.key_pem, pki.ca.key_pem):
        assert key.decode().splitlines()[1] not in message
