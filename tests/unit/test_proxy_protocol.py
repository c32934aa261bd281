"""The proxy's sans-IO parts: how a client names its endpoint, the SASL messages, and
the SCRAM-SHA-256 exchange (checked against scramp's client, an independent one)."""

from __future__ import annotations

import struct

import pytest
import scramp
from hypothesis import given
from hypothesis import strategies as st

from strata.common.errors import ProtocolError, UserError
from strata.pg.wire import StartupMessage
from strata.proxy import protocol
from strata.proxy.scram import AuthFailed, ScramExchange, ScramSecret


def startup(**params: str) -> StartupMessage:
    return StartupMessage(tuple(params.items()))


def test_endpoint_choice_sni_then_options() -> None:
    msg = startup(user="u", options="-c x=y endpoint=opt")
    assert protocol.choose_endpoint("main.localhost", "localhost", msg) == \
        protocol.EndpointChoice("main", "sni")
    assert protocol.choose_endpoint("MAIN.LocalHost.", "localhost", msg).name == "main"
    assert protocol.choose_endpoint("main.other", "localhost", msg) == \
        protocol.EndpointChoice("opt", "options")
    assert protocol.choose_endpoint(None, "localhost", startup(user="u")).name is None
    assert protocol.choose_endpoint("localhost", "localhost", startup(user="u")).name is None
    assert protocol.endpoint_from_options("--endpoint=a") == "a"
    with pytest.raises(ProtocolError, match="without a name"):
        protocol.endpoint_from_options("endpoint=")


def test_compute_startup_drops_only_the_endpoint_option() -> None:
    msg = startup(user="u", database="d", options="endpoint=e -c work_mem=1MB")
    assert protocol.startup_for_compute(msg).parameters == (
        ("user", "u"), ("database", "d"), ("options", "-c work_mem=1MB"))
    only = protocol.startup_for_compute(startup(user="u", options="endpoint=e"))
    assert only.parameters == (("user", "u"),)


def test_password_form() -> None:
    assert protocol.split_endpoint_password("endpoint=main;p;w=") == ("main", "p;w=")
    for bad in ("secret", "endpoint=;x", "project=x;y", "endpoint=x"):
        with pytest.raises(ProtocolError, match="no endpoint named"):
            protocol.split_endpoint_password(bad)


def test_sasl_messages() -> None:
    body = b"SCRAM-SHA-256\0" + struct.pack("!i", 3) + b"abc"
    assert protocol.decode_sasl_initial_response(body) == ("SCRAM-SHA-256", b"abc")
    for bad in (b"SCRAM", b"SCRAM\0\0", b"SCRAM\0" + struct.pack("!i", 5) + b"abc",
                b"SCRAM\0" + struct.pack("!i", -7)):
        with pytest.raises(ProtocolError):
            protocol.decode_sasl_initial_response(bad)
    assert protocol.auth_sasl() == b"R" + struct.pack("!ii", 23, 10) + b"SCRAM-SHA-256\0\0"
    assert protocol.decode_password(b"pw\0") == "pw"
    with pytest.raises(ProtocolError):
        protocol.decode_password(b"pw")


@given(st.binary(max_size=64))
def test_sasl_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decode in (protocol.decode_sasl_initial_response, protocol.decode_password):
        try:
            decode(data)
        except ProtocolError:
            pass


def test_secret_round_trip_and_password_check() -> None:
    secret = ScramSecret.from_password("s3cret")
    assert ScramSecret.parse(str(secret)) == secret
    assert str(secret).startswith("SCRAM-SHA-256$4096:")
    assert "s3cret" not in str(secret) and "s3cret" not in repr(secret)
    assert secret.matches("s3cret") and not secret.matches("s3cret ")
    with pytest.raises(UserError, match="must look like"):
        ScramSecret.parse("md5abc")
    with pytest.raises(UserError, match="must not be empty"):
        ScramSecret.from_password("")


def _exchange(secret: ScramSecret, password: str) -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], "ignored", password)
    server = ScramExchange(secret)
    client.set_server_first(server.first(client.get_client_first().encode()).decode())
    final = server.final(client.get_client_final().encode())
    client.set_server_final(final.decode())  # the client checks the server's signature


def test_scram_exchange_against_scramp_client() -> None:
    secret = ScramSecret.from_password("right")
    _exchange(secret, "right")
    with pytest.raises(AuthFailed):
        _exchange(secret, "wrong")


def test_scram_refuses_malformed_messages() -> None:
    secret = ScramSecret.from_password("right")
    # libpq's form: an empty user name (PostgreSQL takes it from the startup packet).
    assert ScramExchange(secret).first(b"n,,n=,r=abcdef").startswith(b"r=abcdef")
    for bad in (b"", b"n,,", b"p=tls-server-end-point,,n=,r=x", b"n,,r=x,n=",
                b"\xff\xfe", b"x,,n=,r=abc"):
        with pytest.raises(ProtocolError):
            ScramExchange(secret).first(bad)
    ex = ScramExchange(secret, server_nonce="SERVER")
    ex.first(b"n,,n=,r=client")
    for bad in (b"c=biws,r=clientSERVER", b"c=biws,r=other,p=AAAA",
                b"c=eSws,r=clientSERVER,p=AAAA", b"c=biws,r=clientSERVER,p=!!"):
        with pytest.raises(ProtocolError):
            ex.final(bad)
