"""The parts of h2 and hpack that shared/transport reaches into, beyond their public API. These
libraries are pinned (requirements/dispatch.txt); an upgrade that changes any of this shape
fails here, before it can fail in production."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from h2.config import H2Configuration
from h2.connection import ConnectionInputs, ConnectionState, H2Connection
from h2.events import ConnectionTerminated, ResponseReceived
from h2.settings import SettingCodes, Settings
from hpack import Decoder
from hpack.hpack import encode_integer
from hpack.table import HeaderTable

from shared.transport.http2 import CLIENT_CONFIG, DrainingStateMachine, LiteralEncoder

REPO = Path(__file__).resolve().parent.parent
INTERNALS_USED = ("h2", "hpack", "hyperframe")


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / "dispatch.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


def test_the_libraries_whose_internals_are_used_are_pinned_and_installed_at_the_pin() -> None:
    pins = pinned_versions()
    for name in INTERNALS_USED:
        assert name in pins, f"{name} must be pinned in requirements/dispatch.txt"
        assert metadata.version(name) == pins[name]


def test_h2s_state_machine_has_the_transition_the_draining_one_replaces() -> None:
    key = (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY)
    assert key in DrainingStateMachine.__mro__[1]._transitions
    assert DrainingStateMachine._transitions[key] == (None, ConnectionState.CLIENT_OPEN)


def server_and_client() -> tuple[H2Connection, H2Connection]:
    server = H2Connection(H2Configuration(client_side=False))
    server.initiate_connection()
    client = H2Connection(CLIENT_CONFIG)
    client.state_machine = DrainingStateMachine()
    client.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return server, client


def test_a_connection_that_read_a_goaway_still_reads_the_answers_before_it() -> None:
    server, client = server_and_client()
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                            (b":authority", b"a"), (b":path", b"/")], end_stream=True)
    server.receive_data(client.data_to_send())
    server.close_connection(last_stream_id=1)
    events = client.receive_data(server.data_to_send())
    assert any(isinstance(e, ConnectionTerminated) for e in events)

    events = client.receive_data(_headers_frame(server, 1))
    assert any(isinstance(e, ResponseReceived) for e in events)


def _headers_frame(server: H2Connection, stream_id: int) -> bytes:
    """A HEADERS frame for ``stream_id`` as the server's encoder makes it (the server, having
    sent GOAWAY, is closed in h2's eyes: its frame is built by hand)."""
    from hyperframe.frame import HeadersFrame

    frame = HeadersFrame(stream_id)
    frame.data = server.encoder.encode([(b":status", b"200")])
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    return frame.serialize()


def test_h2_drops_what_it_queued_when_it_reads_a_goaway() -> None:
    """Why the client writes what it queued before it reads (shared/transport/http2.py, GOAWAY):
    if h2 stops doing this, that write is merely early, never wrong."""
    server, client = server_and_client()
    server.close_connection()
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                            (b":authority", b"a"), (b":path", b"/")], end_stream=True)
    client.receive_data(server.data_to_send())
    assert client.data_to_send() == b""


def test_h2_connection_attributes_the_client_sets_and_reads() -> None:
    connection = H2Connection(CLIENT_CONFIG)
    for name in ("encoder", "decoder", "state_machine", "local_settings", "remote_settings",
                 "highest_outbound_stream_id"):
        assert hasattr(connection, name), name
    assert hasattr(connection.decoder, "max_header_list_size")
    settings = Settings(client=True, initial_values={SettingCodes.ENABLE_PUSH: 0})
    connection.local_settings = settings
    connection.initiate_connection()
    assert connection.local_settings[SettingCodes.ENABLE_PUSH] == 0
    assert connection.remote_settings.max_concurrent_streams > 2**31


def test_hpack_internals_the_literal_encoder_uses() -> None:
    assert len(HeaderTable.STATIC_TABLE) == 61
    assert HeaderTable.STATIC_TABLE[1] == (b":method", b"GET")
    assert bytes(encode_integer(1337, 5)) == b"\x1f\x9a\x0a"  # RFC 7541 C.1.2
    encoder = LiteralEncoder()
    assert hasattr(encoder.header_table, "resized")
    encoder.header_table_size = 0
    block = encoder.encode([(b"x-a", b"1")])
    assert [tuple(h) for h in Decoder().decode(block, raw=True)] == [(b"x-a", b"1")]


def test_h2_counts_open_outbound_streams_through_the_property_the_client_overrides() -> None:
    """shared/transport/http2.py's _CountingH2Connection replaces ``open_outbound_streams`` and
    calls ``_open_streams`` to forget closed streams."""
    import inspect

    source = inspect.getsource(H2Connection.send_headers)
    assert "self.open_outbound_streams" in source
    assert callable(getattr(H2Connection, "_open_streams"))
    assert isinstance(H2Connection.__dict__["open_outbound_streams"], property)
