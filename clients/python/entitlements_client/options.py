"""How a client connects and retries: TLS (optionally mutual), the bearer token, the retry policy."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import grpc

from entitlements_client._version import __version__

__all__ = ["NO_RETRY", "ReconnectPolicy", "RetryPolicy", "Tls"]

USER_AGENT = f"dodo-entitlements-client/{__version__}"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter, applied to UNAVAILABLE answers of calls that are safe to repeat.

    Before retry n (1-based) the client sleeps a random time in [cap * (1 - jitter), cap], where
    cap = min(max_backoff, initial_backoff * multiplier ** (n - 1)). The call's deadline bounds everything: no
    attempt starts, and no sleep is taken, past it.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("backoffs must satisfy 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry` (1 = the second attempt)."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(retry - 1, 0))
        draw = (rng or random).random()
        return cap * (1 - self.jitter * draw)


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class ReconnectPolicy:
    """How `watch()` reconnects after UNAVAILABLE or WATCH_SUBSCRIBER_TOO_SLOW: bounded exponential backoff with
    jitter between consecutive failed attempts (as `RetryPolicy`), reset by any message received.
    `max_attempts` None reconnects forever; n gives up (raising the last failure) after n failures in a row."""

    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (or None: reconnect forever)")
        # The same bounds as RetryPolicy's.
        RetryPolicy(
            initial_backoff=self.initial_backoff,
            max_backoff=self.max_backoff,
            multiplier=self.multiplier,
            jitter=self.jitter,
        )

    def backoff(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before reconnecting after `failures` consecutive failures (1 = the first)."""
        policy = RetryPolicy(
            initial_backoff=self.initial_backoff,
            max_backoff=self.max_backoff,
            multiplier=self.multiplier,
            jitter=self.jitter,
        )
        return policy.backoff(failures, rng)


def _pem(value: bytes | str | Path | None, what: str) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as error:
        raise ValueError(f"{what}: cannot read {value}: {error.strerror or error}") from None


@dataclass(frozen=True)
class Tls:
    """TLS to the server. Without `root_certificates` the system's trusted roots are used; `certificate_chain` and
    `private_key` (together) present a client certificate for mutual TLS. Each is PEM bytes (use `from_files` for
    paths). `server_name` overrides the name the server's certificate is checked against."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate and its private key go together")

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        *,
        server_name: str | None = None,
    ) -> Tls:
        return cls(
            root_certificates=_pem(ca, "CA certificate"),
            certificate_chain=_pem(cert, "client certificate"),
            private_key=_pem(key, "client key"),
            server_name=server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


@dataclass(frozen=True)
class ChannelSpec:
    """Everything both clients need to open a channel and authenticate calls."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, str | int], ...]
    metadata: tuple[tuple[str, str], ...]

    @classmethod
    def build(
        cls,
        target: str,
        *,
        token: str | None,
        tls: Tls | bool | None,
        options: tuple[tuple[str, str | int], ...] = (),
    ) -> ChannelSpec:
        if not target or not target.strip():
            raise ValueError("target must name the server, e.g. 127.0.0.1:50051")
        if tls is True:
            tls = Tls()
        channel_options: list[tuple[str, str | int]] = [("grpc.primary_user_agent", USER_AGENT)]
        if isinstance(tls, Tls) and tls.server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel_options.extend(options)
        return cls(
            target=target.strip(),
            credentials=tls.credentials() if isinstance(tls, Tls) else None,
            options=tuple(channel_options),
            metadata=bearer(token),
        )


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """The authorization header for `token`; refused early (without echoing it) when gRPC could not send it."""
    if token is None or token == "":
        return ()
    if not all("!" <= character <= "~" for character in token):
        raise ValueError("token must be printable ASCII without spaces (is it a placeholder like '…'?)")
    return (("authorization", f"Bearer {token}"),)
