"""TLS on both legs: contexts built from the config, the client upgrade, the server negotiation.

A config that asks for TLS it cannot have (a file missing or unreadable, a key that does
not fit its certificate, an unknown protocol name) is a `ConfigError` naming the key, at
start, at `--check-config` and at every reload: nothing falls back to cleartext silently.

Client links upgrade in place after SSLRequest (`loop.start_tls`), or start in TLS when
their first byte opens a TLS handshake (PostgreSQL 17's direct negotiation, ALPN
`postgresql` required), on the same port. Server links send
SSLRequest on a bare socket, read the one-byte answer, and only then hand the socket to
the event loop with or without TLS: the handshake happens once, when the link opens, and
the session is kept for the link's whole life.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from .config import TLS_FILE_KEYS, ConfigError, PoolerConfig, SslMode
from .protocol.startup import build_ssl_request

# The ALPN protocol PostgreSQL 17 registers for its connections.
ALPN = "postgresql"

_VERSIONS = {
    "tlsv1.0": ssl.TLSVersion.TLSv1,
    "tlsv1": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}
_PROTOCOL_ALIASES = {
    "secure": ("tlsv1.2", "tlsv1.3"),
    "default": ("tlsv1.2", "tlsv1.3"),
    "all": ("tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"),
    "legacy": ("tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"),
}
# libtls's cipher aliases (PgBouncer's values) that mean "the library's own choice".
_DEFAULT_CIPHERS = frozenset({"default", "secure", "normal", "fast"})


class TlsRefused(ConnectionError):
    """The server cannot give the TLS that server_tls_sslmode demands (no TLS, or a
    certificate that fails verification): certain to fail again until the config or the
    server's certificate changes, so the pool fails its queue at once."""


@dataclass
class TlsStats:
    """Handshakes since start, for /metrics: completed and failed, per leg."""

    client_handshakes: int = 0
    client_failures: int = 0
    server_handshakes: int = 0
    server_failures: int = 0


@dataclass(frozen=True)
class TlsContexts:
    """The contexts of one config: None on a leg whose mode is disable."""

    client: ssl.SSLContext | None
    client_mode: SslMode
    server: ssl.SSLContext | None
    server_mode: SslMode


def parse_protocols(value: str, key: str) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """(lowest, highest) TLS version from PgBouncer's protocols value ("secure", "tlsv1.2,tlsv1.3")."""
    names: list[str] = []
    for word in value.replace(":", ",").replace(" ", ",").lower().split(","):
        if not word:
            continue
        if word in _PROTOCOL_ALIASES:
            names.extend(_PROTOCOL_ALIASES[word])
        elif word in _VERSIONS:
            names.append(word)
        else:
            raise ConfigError(f"{key}: unknown TLS protocol {word!r} (secure, all, legacy, tlsv1.0 .. tlsv1.3)")
    if not names:
        raise ConfigError(f"{key}: names no TLS protocol")
    versions = sorted({_VERSIONS[name] for name in names})
    return versions[0], versions[-1]


def _readable(key: str, path: str) -> str:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    return path


def _no_password() -> str:
    # An encrypted key would otherwise make OpenSSL prompt on the terminal.
    raise ConfigError("the key file is encrypted; give an unencrypted key")


def _configure(ctx: ssl.SSLContext, config: PoolerConfig, side: str) -> None:
    """Key pair, CA, protocols and ciphers of `side` ("client" or "server") into ctx."""
    key_file: str | None = getattr(config, f"{side}_tls_key_file")
    cert_file: str | None = getattr(config, f"{side}_tls_cert_file")
    ca_file: str | None = getattr(config, f"{side}_tls_ca_file")
    if key_file and cert_file:
        _readable(f"{side}_tls_key_file", key_file)
        _readable(f"{side}_tls_cert_file", cert_file)
        try:
            ctx.load_cert_chain(cert_file, key_file, password=_no_password)
        except ConfigError as exc:
            raise ConfigError(f"{side}_tls_key_file: {key_file}: {exc}") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{side}_tls_cert_file/{side}_tls_key_file: {cert_file}, {key_file}: "
                f"not a PEM certificate and its matching key ({exc})"
            ) from None
    if ca_file:
        _readable(f"{side}_tls_ca_file", ca_file)
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{side}_tls_ca_file: {ca_file}: not PEM certificates ({exc})") from None
    lowest, highest = parse_protocols(getattr(config, f"{side}_tls_protocols"), f"{side}_tls_protocols")
    try:
        ctx.minimum_version = lowest
        ctx.maximum_version = highest
    except (ValueError, ssl.SSLError) as exc:
        raise ConfigError(f"{side}_tls_protocols: not available here ({exc})") from None
    ciphers: str = getattr(config, f"{side}_tls_ciphers")
    if ciphers.lower() not in _DEFAULT_CIPHERS:
        try:
            ctx.set_ciphers(ciphers)
        except ssl.SSLError:
            raise ConfigError(f"{side}_tls_ciphers: no cipher matches {ciphers!r}") from None


class _SSLObject(ssl.SSLObject):
    """ssl.SSLObject whose per-record calls go straight to the C object.

    The event loop's TLS layer calls read, write and pending a few times for every record
    (uvloop binds them once per connection); ssl.SSLObject's versions are Python functions
    that only pass the call on. Bound here to the C methods, a record costs no Python frame.
    Installed through SSLContext.sslobject_class, the documented hook for a subclass.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> _SSLObject:
        obj = cast(_SSLObject, super()._create(*args, **kwargs))  # type: ignore[misc]
        inner = getattr(obj, "_sslobj", None)
        if inner is not None:  # CPython's layout; elsewhere the plain methods serve
            obj.read = inner.read  # type: ignore[method-assign]
            obj.write = inner.write  # type: ignore[method-assign]
            obj.pending = inner.pending  # type: ignore[method-assign]
        return obj


def client_context(config: PoolerConfig) -> ssl.SSLContext | None:
    """The context the pooler answers clients' TLS with (it is their server)."""
    mode = config.client_tls_sslmode
    if mode is SslMode.DISABLE:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, config, "client")
    if mode.verifies:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif config.client_tls_ca_file:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols([ALPN])
    # No TLS 1.3 session tickets, as PostgreSQL sends none: PostgreSQL drivers never resume
    # a session (libpq keeps none between connections), so tickets would be two records
    # encrypted and sent with every handshake for nothing.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET
    ctx.sslobject_class = _SSLObject
    return ctx


def server_context(config: PoolerConfig) -> ssl.SSLContext | None:
    """The context the pooler reaches PostgreSQL with (it is the server's client)."""
    mode = config.server_tls_sslmode
    if mode is SslMode.DISABLE:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslobject_class = _SSLObject
    # libpq's meaning: only verify-full checks the host name; only verify-* the chain.
    ctx.check_hostname = mode is SslMode.VERIFY_FULL
    if not mode.verifies:
        ctx.verify_mode = ssl.CERT_NONE
    _configure(ctx, config, "server")
    if mode.verifies and not config.server_tls_ca_file:
        ctx.load_default_certs()
    return ctx


def build_contexts(config: PoolerConfig) -> TlsContexts:
    """Both legs' contexts; a ConfigError names the setting that cannot be honoured."""
    return TlsContexts(
        client_context(config), config.client_tls_sslmode, server_context(config), config.server_tls_sslmode
    )


def file_signature(config: PoolerConfig) -> tuple[tuple[str, int, int, int], ...]:
    """What the TLS files are now (path, inode, size, mtime): a change means they were rotated.

    Kubernetes swaps a Secret volume's files atomically through a symlink; stat follows it.
    """
    out = []
    for key in TLS_FILE_KEYS:
        path: str | None = getattr(config, key)
        if path:
            try:
                st = os.stat(path)
            except OSError:
                out.append((path, -1, -1, -1))
            else:
                out.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def describe(transport: asyncio.BaseTransport | None) -> str:
    """What SHOW CLIENTS/SERVERS print in `tls`: "TLSv1.3/TLS_AES_256_GCM_SHA384", or "" in the clear."""
    if transport is None:
        return ""
    obj = transport.get_extra_info("ssl_object")
    if obj is None:
        return ""
    cipher = obj.cipher()
    return f"{obj.version()}/{cipher[0]}" if cipher else str(obj.version())


# -- the client leg -------------------------------------------------------------------------
# The first byte of a TLS handshake record: a client that opens with it negotiates TLS
# directly (PostgreSQL 17's sslnegotiation=direct) instead of sending SSLRequest.
HANDSHAKE_RECORD = 0x16


async def upgrade_client(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    ctx: ssl.SSLContext,
    stats: TlsStats,
    timeout: float | None,
    hello: bytes = b"",
) -> asyncio.Transport:
    """Run the server side of a handshake on the client's socket.

    Without `hello` the client sent SSLRequest: answer 'S' first. With it the client
    opened with its ClientHello (direct TLS), already read off the socket: those bytes
    are handed to the TLS layer before it reads anything else.
    """
    # uvloop's transports are not asyncio.Transport subclasses, only alike.
    link = cast(asyncio.Transport, transport)
    # Nothing more may reach the clear-text protocol (the ClientHello answers the 'S'):
    # start_tls resumes reading once its TLS layer is in place, in its first step.
    link.pause_reading()
    starting = loop.start_tls(link, protocol, ctx, server_side=True, ssl_handshake_timeout=timeout)
    if hello:
        # start_tls's first step (a task scheduled here, so it runs first) swaps the TLS
        # layer in and schedules its start and the resumed reading; _replay runs right
        # after it, before the loop polls the socket again, so the ClientHello comes first.
        handshake: Awaitable[asyncio.Transport | None] = asyncio.ensure_future(starting)
        loop.call_soon(_replay, link, protocol, hello)
    else:
        link.write(b"S")
        handshake = starting  # awaited in place: no task of its own
    try:
        upgraded = await handshake
    except BaseException:
        stats.client_failures += 1
        link.abort()
        raise
    if upgraded is None:  # the client hung up during the handshake
        stats.client_failures += 1
        raise ConnectionResetError("client closed the connection during the TLS handshake")
    stats.client_handshakes += 1
    return upgraded


def _replay(link: asyncio.Transport, app: asyncio.BaseProtocol, data: bytes) -> None:
    """Feed bytes already read in the clear to the TLS layer that now owns the link.

    asyncio's and uvloop's TLS layers are buffered protocols: get_buffer/buffer_updated
    is how their transports hand them what the socket gave.
    """
    layer = link.get_protocol()
    if layer is app or not hasattr(layer, "buffer_updated"):
        # The TLS layer is not in place: never guess, drop the link.
        link.abort()
        return
    # uvloop's TLS layer is alike, not an asyncio.BufferedProtocol subclass.
    layer = cast(asyncio.BufferedProtocol, layer)
    view = memoryview(data)
    while view:
        buffer = memoryview(layer.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        layer.buffer_updated(size)
        view = view[size:]


def alpn_agreed(transport: asyncio.BaseTransport) -> bool:
    """Whether the client named ALPN `postgresql` in its handshake (PostgreSQL 17 requires
    it of direct TLS, so that a TLS connection meant for another protocol is refused)."""
    obj = transport.get_extra_info("ssl_object")
    return obj is not None and obj.selected_alpn_protocol() == ALPN


# -- the server leg -------------------------------------------------------------------------
P = TypeVar("P", bound=asyncio.BaseProtocol)


async def connect_server(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], P],
    host: str,
    port: int,
    tls: TlsContexts,
    stats: TlsStats,
) -> tuple[asyncio.BaseTransport, P]:
    """A TCP link to PostgreSQL, negotiated as server_tls_sslmode says.

    allow and prefer take TLS when the server offers it and go on in the clear when it
    answers 'N' (as PgBouncer does); require and verify-* refuse the link instead.
    """
    ctx = tls.server
    if ctx is None:
        return await loop.create_connection(factory, host, port)
    sock = await _open_socket(loop, host, port)
    try:
        await loop.sock_sendall(sock, build_ssl_request())
        answer = await loop.sock_recv(sock, 1)
        if answer == b"S":
            try:
                # Any byte the server sent after 'S' stays in the socket and fails the
                # handshake: nothing unencrypted is read as if it came through TLS.
                link = await loop.create_connection(factory, sock=sock, ssl=ctx, server_hostname=host)
            except ssl.SSLCertVerificationError as exc:
                stats.server_failures += 1
                raise TlsRefused(f"server certificate refused ({server_mode_text(tls)}): {exc.verify_message}") from exc
            except BaseException:
                stats.server_failures += 1
                raise
            stats.server_handshakes += 1
            return link
        if answer == b"N":
            if tls.server_mode.demands_tls:
                raise TlsRefused(f"server_tls_sslmode is {tls.server_mode.value} and the server does not offer TLS")
            return await loop.create_connection(factory, sock=sock)
        if not answer:
            raise ConnectionResetError("server closed the connection after SSLRequest")
        raise ConnectionError(f"server answered SSLRequest with {answer!r}")
    except BaseException:
        sock.close()
        raise


def server_mode_text(tls: TlsContexts) -> str:
    return f"server_tls_sslmode {tls.server_mode.value}"


def _numeric(host: str, port: int) -> list[tuple[int, int, int, str, tuple[str, int]]] | None:
    """The address of an IP literal without asking the resolver (a thread per lookup)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]


async def _open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    # asyncio's create_connection skips the resolver for IP literals too: a storm of new
    # server links must not queue behind the executor's few threads.
    infos = _numeric(host, port) or await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    assert error is not None
    raise error


async def open_server_stream(
    loop: asyncio.AbstractEventLoop, host: str, port: int, tls: TlsContexts, stats: TlsStats
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`asyncio.open_connection` negotiated like a pool's links (for cancel requests)."""
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await connect_server(loop, lambda: protocol, host, port, tls, stats)
    return reader, asyncio.StreamWriter(cast(asyncio.Transport, transport), protocol, reader, loop)
