"""The sans-io codec: bytes in, messages out, exact bytes back."""

from __future__ import annotations

import struct

import pytest
from pgfleet.pooler.protocol import backend, frontend
from pgfleet.pooler.protocol.errors import ProtocolError
from pgfleet.pooler.protocol.framing import MessageReader, StartupReader, frame
from pgfleet.pooler.protocol.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    build_cancel_request,
    build_ssl_request,
    build_startup_message,
    parse_startup_packet,
)


def test_frame_counts_its_own_length() -> None:
    assert frame(b"Q", b"SELECT 1\x00") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert frontend.TERMINATE == b"X\x00\x00\x00\x04"
    assert frontend.query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"


def test_message_reader_keeps_partial_messages_between_feeds() -> None:
    stream = frontend.query("SELECT 1") + frontend.SYNC + frontend.query("SELECT 2")
    reader = MessageReader()
    reader.feed(stream[:3])
    assert reader.messages() == []
    reader.feed(stream[3:16])
    assert reader.messages() == [(ord("Q"), b"SELECT 1\x00")]
    reader.feed(stream[16:])
    assert reader.messages() == [(ord("S"), b""), (ord("Q"), b"SELECT 2\x00")]
    assert reader.take_raw() == b""  # nothing left buffered


@pytest.mark.parametrize("length", [0, 3, -1, (1 << 30) + 1])
def test_message_reader_rejects_impossible_lengths(length: int) -> None:
    reader = MessageReader()
    reader.feed(b"Q" + struct.pack("!i", length) + b"xxxx")
    with pytest.raises(ProtocolError):
        reader.messages()


def test_startup_message_round_trip() -> None:
    packet = build_startup_message({"user": "alice", "database": "app", "application_name": "x"})
    reader = StartupReader()
    assert reader.feed(packet[:5]) is None
    result = reader.feed(packet[5:] + b"extra")
    assert result is not None
    body, rest = result
    assert rest == b"extra"
    parsed = parse_startup_packet(body)
    assert parsed == StartupMessage({"user": "alice", "database": "app", "application_name": "x"})
    assert isinstance(parsed, StartupMessage)
    assert parsed.database == "app"


def test_database_defaults_to_user_name() -> None:
    packet = build_startup_message({"user": "bob"})
    parsed = parse_startup_packet(packet[4:])
    assert isinstance(parsed, StartupMessage) and parsed.database == "bob"


def test_special_startup_packets() -> None:
    assert parse_startup_packet(build_ssl_request()[4:]) == SSLRequest()
    assert parse_startup_packet(struct.pack("!i", 80877104)) == GSSENCRequest()
    assert parse_startup_packet(build_cancel_request(42, -7)[4:]) == CancelRequest(42, -7)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (struct.pack("!i", 2 << 16), "0A000"),  # protocol 2.0
        (struct.pack("!i", 196608) + b"user\x00", "08P01"),  # unterminated
        (struct.pack("!i", 196608) + b"\x00", "28000"),  # no user
        (struct.pack("!ii", 80877102, 1), "08P01"),  # short cancel request
        (b"\x00\x03", "08P01"),
        (struct.pack("!i", 196608) + b"user\x00\xff\xfe\x00\x00", "08P01"),  # not UTF-8
    ],
)
def test_malformed_startup_packets_name_the_problem(body: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_startup_packet(body)
    assert info.value.code == code


@pytest.mark.parametrize("length", [4, 7, 10_001])
def test_startup_reader_bounds_the_length(length: int) -> None:
    with pytest.raises(ProtocolError):
        StartupReader().feed(struct.pack("!i", length) + b"\x00" * 8)


def test_error_response_fields_round_trip() -> None:
    raw = backend.error_response("28P01", "password authentication failed", "FATAL", detail="d")
    assert raw[:1] == b"E"
    fields = backend.parse_error_fields(raw[5:])
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "password authentication failed", "D": "d"}


def test_error_fields_tolerate_a_truncated_error() -> None:
    # No SQLSTATE, no terminator: what a broken or hostile server may send.
    assert backend.parse_error_fields(b"Mboom") == {"M": "boom"}


def test_backend_builders_exact_bytes() -> None:
    assert backend.ready_for_query(backend.IDLE) == b"Z\x00\x00\x00\x05I"
    assert backend.authentication_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert backend.authentication_md5(b"salt") == b"R\x00\x00\x00\x0c\x00\x00\x00\x05salt"
    assert backend.parameter_status("TimeZone", "UTC") == b"S\x00\x00\x00\x11TimeZone\x00UTC\x00"
    assert backend.backend_key_data(1, 2) == b"K\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x02"
    assert backend.command_complete("SHOW") == b"C\x00\x00\x00\x09SHOW\x00"
    assert backend.data_row(["a", None]) == b"D\x00\x00\x00\x0f\x00\x02\x00\x00\x00\x01a\xff\xff\xff\xff"


def test_sasl_messages() -> None:
    raw = backend.authentication_sasl(["SCRAM-SHA-256"])
    request = backend.parse_authentication(raw[5:])
    assert request.code == backend.AUTH_SASL
    assert backend.parse_sasl_mechanisms(request.data) == ["SCRAM-SHA-256"]
    initial = frontend.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    assert (
        initial
        == b"p" + struct.pack("!i", 4 + 14 + 4 + 11) + b"SCRAM-SHA-256\x00" + struct.pack("!i", 11) + b"n,,n=,r=abc"
    )
