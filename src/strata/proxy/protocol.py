"""The proxy's side of the PostgreSQL startup phase, without I/O: which endpoint a client
names, and the SASL (SCRAM-SHA-256) messages of authentication.

A client names its endpoint in one of three ways, tried in this order:

    TLS SNI          host name `<endpoint>.<domain>` (libpq sends the `host` it was given)
    options          startup parameter `options` holding `endpoint=<name>` (libpq:
                     `options=endpoint%3D<name>` in a URI, or PGOPTIONS)
    password         `endpoint=<name>;<password>` as a cleartext password, for clients
                     that send neither (the proxy then asks for a cleartext password)

SASL messages (PostgreSQL 15 "Message Formats"; `auth-scram.c`), all typed 'p' from the
client and 'R' from the server:

    SASLInitialResponse  'p' mechanism cstring, int32 length (-1: none), data
    SASLResponse         'p' data (the whole body)
    AuthenticationSASL   'R' int32 10, mechanism cstrings, terminating NUL
    ...SASLContinue      'R' int32 11, data
    ...SASLFinal         'R' int32 12, data

Malformed input raises `ProtocolError`; nothing else escapes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.common.errors import ProtocolError
from strata.pg.wire import AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL, StartupMessage

SCRAM_SHA_256 = "SCRAM-SHA-256"
_I32 = struct.Struct("!i")
ENDPOINT_OPTION = "endpoint"

# SQLSTATEs of the errors the proxy sends (PostgreSQL errcodes.txt).
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
PROTOCOL_VIOLATION = "08P01"
CONNECTION_REJECTED = "08004"
CANNOT_CONNECT_NOW = "57P03"


@dataclass(frozen=True, slots=True)
class EndpointChoice:
    """The endpoint a client named (None: it named none) and how it named it."""

    name: str | None
    source: str  # "sni", "options", "none"


def endpoint_from_sni(server_name: str | None, domain: str) -> str | None:
    """`main` from `main.<domain>`; None for no SNI or another domain."""
    if not server_name:
        return None
    suffix = "." + domain.lower().strip(".")
    host = server_name.lower().rstrip(".")
    if not host.endswith(suffix) or len(host) == len(suffix):
        return None
    return host[:-len(suffix)]


def endpoint_from_options(options: str | None) -> str | None:
    """`endpoint=<name>` among the space-separated words of the `options` parameter
    (also `--endpoint=<name>`; other words, such as `-c x=y`, are left to PostgreSQL)."""
    if not options:
        return None
    for word in options.split():
        key, sep, value = word.lstrip("-").partition("=")
        if sep and key == ENDPOINT_OPTION:
            if not value:
                raise ProtocolError("options has `endpoint=` without a name; write "
                                    "`endpoint=<name>`")
            return value
    return None


def strip_endpoint_option(options: str) -> str:
    """`options` without the endpoint word, which PostgreSQL would refuse."""
    kept = [w for w in options.split() if w.lstrip("-").partition("=")[0] != ENDPOINT_OPTION]
    return " ".join(kept)


def choose_endpoint(server_name: str | None, domain: str,
                    startup: StartupMessage) -> EndpointChoice:
    by_sni = endpoint_from_sni(server_name, domain)
    if by_sni is not None:
        return EndpointChoice(by_sni, "sni")
    by_options = endpoint_from_options(startup.get("options"))
    if by_options is not None:
        return EndpointChoice(by_options, "options")
    return EndpointChoice(None, "none")


def split_endpoint_password(text: str) -> tuple[str, str]:
    """(`name`, `password`) from the password form `endpoint=<name>;<password>`."""
    head, sep, password = text.partition(";")
    key, eq, name = head.partition("=")
    if not sep or not eq or key.strip() != ENDPOINT_OPTION or not name.strip():
        raise ProtocolError("no endpoint named: connect with TLS and host name "
                            "<endpoint>.<domain>, or options=endpoint=<name>, or the password "
                            "`endpoint=<name>;<password>`")
    return name.strip(), password


def startup_for_compute(startup: StartupMessage) -> StartupMessage:
    """The client's startup parameters as the compute gets them: without the endpoint
    option (PostgreSQL would refuse an unknown `options` word)."""
    params: list[tuple[str, str]] = []
    for key, value in startup.parameters:
        if key == "options":
            value = strip_endpoint_option(value)
            if not value:
                continue
        params.append((key, value))
    return StartupMessage(tuple(params), startup.protocol)


# --- SASL messages -------------------------------------------------------------------------
def _auth(code: int, data: bytes) -> bytes:
    body = _I32.pack(code) + data
    return b"R" + _I32.pack(len(body) + 4) + body


def auth_sasl(mechanisms: tuple[str, ...] = (SCRAM_SHA_256,)) -> bytes:
    return _auth(AUTH_SASL, b"".join(m.encode() + b"\0" for m in mechanisms) + b"\0")


def auth_sasl_continue(data: bytes) -> bytes:
    return _auth(AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data: bytes) -> bytes:
    return _auth(AUTH_SASL_FINAL, data)


def decode_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """(mechanism, client-first-message) of a SASLInitialResponse body."""
    nul = body.find(b"\0")
    if nul < 0:
        raise ProtocolError("SASLInitialResponse without a mechanism name")
    mechanism = body[:nul].decode("utf-8", "replace")
    rest = body[nul + 1:]
    if len(rest) < 4:
        raise ProtocolError("SASLInitialResponse truncated before its data length")
    length = int(_I32.unpack_from(rest)[0])
    data = rest[4:]
    if length == -1:
        data_expected = 0
    elif length < 0:
        raise ProtocolError(f"SASLInitialResponse has invalid data length {length}")
    else:
        data_expected = length
    if len(data) != data_expected:
        raise ProtocolError(f"SASLInitialResponse data is {len(data)} bytes, its length "
                            f"field says {length}")
    return mechanism, data


def decode_password(body: bytes) -> str:
    """A PasswordMessage body: a NUL-terminated string."""
    if not body.endswith(b"\0") or body.count(b"\0") != 1:
        raise ProtocolError("PasswordMessage is not one NUL-terminated string")
    try:
        return body[:-1].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolError("PasswordMessage is not UTF-8") from err
