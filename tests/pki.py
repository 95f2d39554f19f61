"""Test certificates: a CA, a server certificate for 127.0.0.1/localhost, client certificates, generated with
`cryptography` into a folder of the test's (the TLS and mTLS tests of the server and of the client package)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A key and its certificate, as PEM bytes and as files."""

    key_pem: bytes
    cert_pem: bytes
    key_path: Path
    cert_path: Path
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def issue(
    folder: Path,
    name: str,
    *,
    issuer: Issued | None,
    ca: bool = False,
    server: bool = False,
    client: bool = False,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    certificate = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.crt"
    key_path.write_bytes(key_pem)
    cert_path.write_bytes(cert_pem)
    return Issued(key_pem, cert_pem, key_path, cert_path, certificate, key)


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    stranger: Issued  # a client certificate signed by another CA

    def server_env(self) -> dict[str, str]:
        """Settings for a server that speaks TLS and requires client certificates this CA signed (mTLS)."""
        return {
            "ENTITLEMENTS_TLS_CERT": str(self.server.cert_path),
            "ENTITLEMENTS_TLS_KEY": str(self.server.key_path),
            "ENTITLEMENTS_TLS_CLIENT_CA": str(self.ca.cert_path),
        }


def make_pki(folder: Path) -> Pki:
    ca = issue(folder, "test-ca", issuer=None, ca=True)
    other_ca = issue(folder, "other-ca", issuer=None, ca=True)
    return Pki(
        ca=ca,
        server=issue(folder, "server", issuer=ca, server=True),
        client=issue(folder, "client", issuer=ca, client=True),
        stranger=issue(folder, "stranger", issuer=other_ca, client=True),
    )
