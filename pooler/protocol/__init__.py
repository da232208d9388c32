"""Sans-io codec for the PostgreSQL v3 wire protocol.

Nothing in this package performs I/O or imports asyncio: callers feed it bytes and get
messages (or bytes to send) back, so every piece can be tested and fuzzed on its own.
"""
