"""Property-based fuzzing (Hypothesis): the codec, and a running pooler fed hostile bytes.

The codec must answer any bytes with a value or its own error (ProtocolError, AuthFailed),
never another exception. The running pooler (the real `pgfleet-pooler` command) gets random
and mutated startup packets, and after a login, messages of every type with random, empty
and lying lengths, cut at random places; after each case a second client must still be
served, and at the end no server may be left busy or beyond the pool's size, and the
pooler's log must hold no traceback.

`make test` runs a bounded number of cases (seconds); `make fuzz` runs many more
(PGFLEET_FUZZ_EXAMPLES, default there 2000 per test).
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pgfleet.pooler import auth
from pgfleet.pooler.protocol import backend, extended, frontend
from pgfleet.pooler.protocol.errors import ProtocolError
from pgfleet.pooler.protocol.framing import MessageReader, StartupReader, frame
from pgfleet.pooler.protocol.startup import build_startup_message, parse_startup_packet

from .conftest import PoolerProcess

# Cases per test: a few dozen in `make test`, thousands under `make fuzz`.
EXAMPLES = int(os.environ.get("PGFLEET_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written to the checkout; a failure prints its reproducing case
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ----------------------------------------------------------------------------------------

TYPES = b"QPBEDCSHFXdcfp"


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """One client message: a known or any type, a body random or built, a length true or not."""
    # The types the proxy reads (statement and portal names) most often, then any.
    kind = draw(st.one_of(st.sampled_from(list(b"PBDC")), st.sampled_from(list(TYPES)), st.integers(0, 255)))
    body = draw(
        st.one_of(
            st.binary(max_size=40),
            st.binary(max_size=3),
            st.sampled_from([b"S", b"P", b"S\xff\xfe\x00", b"Sname", b"\x00\xff\x00", b"name\x00"]),
            st.builds(lambda n, q: n + b"\x00" + q + b"\x00\x00\x00", st.binary(max_size=8), st.binary(max_size=20)),
            st.builds(lambda n: b"S" + n + b"\x00", st.binary(max_size=8)),
            st.builds(
                lambda p, n, t: p + b"\x00" + n + b"\x00" + t,
                st.binary(max_size=4),
                st.binary(max_size=8),
                st.binary(max_size=12),
            ),
        )
    )
    length = draw(
        st.one_of(
            st.just(len(body) + 4),
            st.integers(-8, len(body) + 12),
            st.sampled_from([0, 3, 10_001, 1 << 30, (1 << 30) + 1, 2**31 - 1]),
        )
    )
    return bytes((kind,)) + struct.pack("!i", length) + body


WELL_FORMED = [
    frontend.query("SELECT 1"),
    extended.parse("s1", "SELECT $1::int", [23]),
    extended.parse("", "SELECT 2"),
    extended.bind("", "s1", b"\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00"),
    extended.bind("", "", b"\x00\x00\x00\x00\x00\x00"),
    extended.describe(extended.STATEMENT, "s1"),
    extended.describe(extended.PORTAL, ""),
    extended.execute(),
    extended.close(extended.STATEMENT, "s1"),
    frontend.SYNC,
    frontend.FLUSH,
    frontend.query("BEGIN"),
    frontend.query("COMMIT"),
    frontend.query("SELECT pg_sleep(0.05)"),
]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo its length), in order."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@st.composite
def sessions(draw: st.DrawFn) -> list[bytes]:
    """What a client sends after its login: well-formed and hostile messages, cut anywhere."""
    parts = draw(st.lists(st.one_of(messages(), st.sampled_from(WELL_FORMED)), min_size=1, max_size=6))
    cuts = draw(st.lists(st.integers(0, 1 << 16), max_size=4))
    return split(b"".join(parts), cuts)


def _startup(params: dict[str, str]) -> bytes:
    return build_startup_message(params)


@st.composite
def startup_packets(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid startup packet (or SSL/cancel request) then mutated."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=80))
    params = {"user": draw(st.sampled_from(["postgres", "", "nobody", "md5user"])), "database": "app"}
    extra = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    params.update({k: v for k, v in extra.items() if "\x00" not in k + v})
    packet = draw(
        st.sampled_from(
            [
                _startup(params),
                struct.pack("!ii", 8, 80877103),  # SSLRequest
                struct.pack("!ii", 8, 80877104),  # GSSENCRequest
                struct.pack("!iiii", 16, 80877102, 1, 2),  # CancelRequest
                struct.pack("!ii", 8, (3 << 16) | 2) + b"",  # 3.2, no parameters
            ]
        )
    )
    mutation = draw(st.sampled_from(["none", "truncate", "flip", "length", "append"]))
    data = bytearray(packet)
    if mutation == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    elif mutation == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= 1 << draw(st.integers(0, 7))
    elif mutation == "length" and len(data) >= 4:
        data[:4] = struct.pack("!i", draw(st.integers(-(2**31), 2**31 - 1)))
    elif mutation == "append":
        data += draw(st.binary(min_size=1, max_size=40))
    return bytes(data)


# -- the codec -------------------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(0, 256), max_size=5))
def test_codec_startup_reader_and_parser_raise_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    reader = StartupReader()
    try:
        for chunk in split(data, cuts):
            packet = reader.feed(chunk)
            if packet is not None:
                parse_startup_packet(packet[0])
                break
    except ProtocolError:
        pass


@FUZZ
@given(startup_packets())
def test_codec_mutated_startup_packets_raise_only_protocol_errors(packet: bytes) -> None:
    try:
        if len(packet) >= 4:
            parse_startup_packet(packet[4:])
    except ProtocolError:
        pass


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from(list(TYPES)), st.binary(max_size=50)), max_size=8),
    st.lists(st.integers(0, 1000), max_size=6),
)
def test_codec_message_reader_reframes_any_split(items: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(frame(bytes((kind,)), body) for kind, body in items)
    reader = MessageReader()
    got: list[tuple[int, bytes]] = []
    for chunk in split(stream, cuts):
        reader.feed(chunk)
        got.extend(reader.messages())
    assert got == items


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 1000), max_size=6))
def test_codec_message_reader_raises_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    reader = MessageReader(max_length=10_000)
    try:
        for chunk in split(data, cuts):
            reader.feed(chunk)
            reader.messages()
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=100))
def test_codec_message_parsers_raise_only_protocol_errors(body: bytes) -> None:
    for parse in (
        backend.parse_error_fields,
        backend.parse_authentication,
        backend.parse_parameter_status,
        backend.parse_backend_key_data,
        extended.split_parse,
    ):
        try:
            parse(body)
        except ProtocolError:
            pass


@FUZZ
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_codec_scram_server_raises_only_auth_failed(client_first: bytes, client_final: bytes) -> None:
    for exchange in (auth.ScramServerExchange.for_secret("secret"), auth.ScramServerExchange.mock("nobody")):
        try:
            exchange.first(client_first)
            exchange.final(client_final)
        except auth.AuthFailed:
            pass


# -- the running pooler ----------------------------------------------------------------------------------


def _read_until_quiet(sock: socket.socket, quiet: float = 0.05, limit: float = 5.0) -> bytes:
    """Whatever the pooler sends until it closes the connection or says nothing for `quiet` s."""
    out = bytearray()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], quiet)
        if not ready:
            break
        try:
            data = sock.recv(65536)
        except OSError:
            break
        if not data:
            break
        out += data
    return bytes(out)


def _send(sock: socket.socket, chunks: list[bytes]) -> None:
    for chunk in chunks:
        try:
            sock.sendall(chunk)
        except OSError:
            return  # the pooler has closed this connection: that is an answer too


def _logged_in(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(build_startup_message({"user": "postgres", "database": "app"}))
    reader = MessageReader()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        assert data, "the pooler closed a good login"
        reader.feed(data)
        if any(kind == ord("Z") for kind, _ in reader.messages()):
            return sock
    raise AssertionError("no ReadyForQuery after login")


class Watch:
    """The second client, the pool and the log of the pooler being fuzzed."""

    def __init__(self, pooler: PoolerProcess) -> None:
        self.pooler = pooler
        self.conn = psycopg.connect(f"host=127.0.0.1 port={pooler.port} user=postgres dbname=app", autocommit=True)
        self.cases = 0

    def still_serves(self) -> None:
        self.cases += 1
        assert self.conn.execute("SELECT 42").fetchone() == (42,)

    def pools(self) -> list[dict[str, object]]:
        dsn = f"host=127.0.0.1 port={self.pooler.port} user=postgres dbname=pgbouncer"
        with psycopg.connect(dsn, autocommit=True) as admin:
            cur = admin.execute("SHOW POOLS")
            names = [column.name for column in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def no_leak(self, pool_size: int) -> None:
        """Every server back (or closed), none beyond the pool's size, nobody left waiting."""
        deadline = time.monotonic() + 30
        while True:
            app = [p for p in self.pools() if p["database"] == "app"]
            busy = sum(int(p["sv_active"]) + int(p["cl_waiting"]) for p in app)  # type: ignore[call-overload]
            servers = sum(int(p[k]) for p in app for k in ("sv_active", "sv_idle", "sv_used", "sv_login"))  # type: ignore[call-overload]
            if busy == 0 and servers <= pool_size:
                break
            assert time.monotonic() < deadline, app
            time.sleep(0.05)
        log = self.pooler.log()
        for sign in ("Traceback", "exception was never retrieved", "Fatal error", "internal error"):
            assert sign not in log, log[-3000:]

    def close(self) -> None:
        self.conn.close()


POOL_SIZE = 3


@pytest.fixture
def watched(pooler_process: Callable[..., PoolerProcess]) -> Iterator[Watch]:
    pooler = pooler_process(
        auth_type="trust",
        default_pool_size=POOL_SIZE,
        admin_users=["postgres"],
        client_login_timeout=5,
        log_pooler_errors=True,
    )
    watch = Watch(pooler)
    yield watch
    try:
        watch.no_leak(POOL_SIZE)
    finally:
        watch.close()
        print(f"fuzz: {watch.cases} cases against the running pooler")


@FUZZ
@given(packet=startup_packets(), cuts=st.lists(st.integers(0, 200), max_size=3))
def test_fuzz_pooler_before_login(watched: Watch, packet: bytes, cuts: list[int]) -> None:
    with socket.create_connection(("127.0.0.1", watched.pooler.port), timeout=5) as sock:
        _send(sock, split(packet, cuts))
        _read_until_quiet(sock)
    watched.still_serves()


@FUZZ
@given(session=sessions())
def test_fuzz_pooler_after_login(watched: Watch, session: list[bytes]) -> None:
    with _logged_in(watched.pooler.port) as sock:
        _send(sock, session)
        _read_until_quiet(sock)
    watched.still_serves()
