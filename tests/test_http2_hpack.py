"""The HPACK encoding of our HTTP/2 clients (FCM's pool, APNs' connections): plain literals that
any HPACK decoder reads back exactly, the bearer token never indexed, nothing in the dynamic
table."""
from __future__ import annotations

from hpack import Decoder, NeverIndexedHeaderTuple

from shared.transport.http2 import LiteralEncoder

TOKEN = b"bearer eyJhbGciOiJFUzI1NiIsImtpZCI6IkFCQzEyMzQ1NjcifQ.e30.c2lnbmF0dXJl"


def request(path: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", path),
        (b"authorization", TOKEN),
        (b"apns-topic", b"org.wikimedia.wikipedia"),
    ]


def test_a_decoder_reads_back_every_header_in_order():
    encoder, decoder = LiteralEncoder(per_request=frozenset({b":path"})), Decoder()

    for path in (b"/3/device/aa", b"/3/device/bb", b"/3/device/aa"):
        decoded = decoder.decode(encoder.encode(request(path)), raw=True)
        assert [tuple(header) for header in decoded] == request(path)


def test_the_bearer_token_is_never_indexed():
    decoded = Decoder().decode(LiteralEncoder().encode(request(b"/")), raw=True)

    [authorization] = [header for header in decoded if header[0] == b"authorization"]
    assert isinstance(authorization, NeverIndexedHeaderTuple)


def test_values_go_as_plain_literals_without_huffman_coding():
    block = LiteralEncoder().encode(request(b"/3/device/0123abcd"))

    assert TOKEN in block and b"/3/device/0123abcd" in block and b"org.wikimedia.wikipedia" in block


def test_nothing_enters_the_dynamic_table():
    encoder, decoder = LiteralEncoder(per_request=frozenset({b":path"})), Decoder()

    for path in (b"/a", b"/b"):
        decoder.decode(encoder.encode(request(path)), raw=True)

    assert len(decoder.header_table.dynamic_entries) == 0


def test_a_table_size_change_the_peer_asks_for_is_signalled_first():
    encoder = LiteralEncoder()
    encoder.header_table_size = 0  # what h2 does on the peer's SETTINGS_HEADER_TABLE_SIZE

    block = encoder.encode(request(b"/"))

    assert block[0] & 0xE0 == 0x20  # RFC 7541 section 6.3: dynamic table size update
    assert [tuple(h) for h in Decoder().decode(block, raw=True)] == request(b"/")
