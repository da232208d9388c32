"""A bare protocol client for tests that must send exact message sequences."""

from __future__ import annotations

import asyncio

from pgfleet.pooler.protocol import backend
from pgfleet.pooler.protocol.framing import MessageReader
from pgfleet.pooler.protocol.startup import build_startup_message


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._messages = MessageReader()
        self._queue: list[tuple[str, bytes]] = []

    @classmethod
    async def connect(cls, port: int, user: str = "postgres", database: str = "app") -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        writer.write(build_startup_message({"user": user, "database": database}))
        await client.until_ready()
        return client

    def send(self, *messages: bytes) -> None:
        self.writer.write(b"".join(messages))

    async def message(self) -> tuple[str, bytes]:
        while not self._queue:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                raise ConnectionError("connection closed")
            self._messages.feed(data)
            self._queue.extend((chr(t), body) for t, body in self._messages.messages())
        return self._queue.pop(0)

    async def until_ready(self, count: int = 1) -> list[tuple[str, bytes]]:
        """Messages up to and including the `count`-th ReadyForQuery."""
        out = []
        while count:
            msg = await self.message()
            out.append(msg)
            if msg[0] == "Z":
                count -= 1
        return out

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def kinds(messages: list[tuple[str, bytes]]) -> str:
    """The message types of a reply stream, as one string ('12DCZ')."""
    return "".join(kind for kind, _ in messages if kind not in "NS")


def error(messages: list[tuple[str, bytes]]) -> dict[str, str]:
    found = [backend.parse_error_fields(body) for kind, body in messages if kind == "E"]
    assert len(found) == 1, messages
    return found[0]


def rows(messages: list[tuple[str, bytes]]) -> list[list[str | None]]:
    out = []
    for kind, body in messages:
        if kind != "D":
            continue
        count = int.from_bytes(body[:2], "big")
        pos, row = 2, []
        for _ in range(count):
            length = int.from_bytes(body[pos : pos + 4], "big", signed=True)
            pos += 4
            if length < 0:
                row.append(None)
            else:
                row.append(body[pos : pos + length].decode())
                pos += length
        out.append(row)
    return out
