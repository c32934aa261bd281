"""Role secrets and the server side of SCRAM-SHA-256 (RFC 5802/7677, via scramp).

A secret is kept in PostgreSQL's own text form (`pg_authid.rolpassword`,
`scram-common.h`), so the control plane can also hand it to the compute with
`ALTER ROLE ... PASSWORD '<secret>'`:

    SCRAM-SHA-256$<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>

The password itself is never stored or logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import scramp

from strata.common.errors import ProtocolError, UserError
from strata.proxy.protocol import SCRAM_SHA_256

ITERATIONS = 4096  # PostgreSQL's default scram_iterations
_SECRET = re.compile(r"SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):"
                     r"([A-Za-z0-9+/=]+)")


@dataclass(frozen=True, slots=True)
class ScramSecret:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def from_password(cls, password: str, *, iterations: int = ITERATIONS) -> ScramSecret:
        if not password:
            raise UserError("a role's password must not be empty")
        salt, stored_key, server_key, i = scramp.ScramMechanism(SCRAM_SHA_256) \
            .make_auth_info(password, iteration_count=iterations)
        return cls(i, salt, stored_key, server_key)

    @classmethod
    def parse(cls, text: str) -> ScramSecret:
        m = _SECRET.fullmatch(text)
        if m is None:
            raise UserError("a role secret must look like SCRAM-SHA-256$<iterations>:<salt>$"
                            "<StoredKey>:<ServerKey>; set it again with `strata role "
                            "password`")
        b64 = base64.b64decode
        return cls(int(m[1]), b64(m[2]), b64(m[3]), b64(m[4]))

    def __str__(self) -> str:
        b64 = base64.b64encode
        return (f"SCRAM-SHA-256${self.iterations}:{b64(self.salt).decode()}$"
                f"{b64(self.stored_key).decode()}:{b64(self.server_key).decode()}")

    def __repr__(self) -> str:
        return f"ScramSecret(iterations={self.iterations})"

    def matches(self, password: str) -> bool:
        """Whether `password` is the one this secret was made from (the cleartext form
        of authentication, for clients that name their endpoint in the password)."""
        salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), self.salt,
                                     self.iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        return hmac.compare_digest(hashlib.sha256(client_key).digest(), self.stored_key)


class ScramExchange:
    """One server-side SCRAM-SHA-256 exchange (no channel binding) for one secret.

    `first(client_first) -> server_first`, then `final(client_final) -> server_final`;
    `final` raises `AuthFailed` for a wrong password, `ProtocolError` for garbage.

    Written here rather than with scramp's server, which refuses the empty user name
    (`n=,`) that libpq sends: PostgreSQL takes the user from the startup packet.
    """

    def __init__(self, secret: ScramSecret, *, server_nonce: str | None = None) -> None:
        self.secret = secret
        self._server_nonce = server_nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""

    def first(self, client_first: bytes) -> bytes:
        text = _text(client_first)
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise ProtocolError("SCRAM client-first message has no gs2 header")
        cbflag, authzid, bare = parts
        if cbflag.startswith("p"):
            raise ProtocolError("SCRAM channel binding (SCRAM-SHA-256-PLUS) is not offered "
                                "by this proxy; connect with channel_binding=prefer/disable")
        if cbflag not in ("n", "y") or (authzid and not authzid.startswith("a=")):
            raise ProtocolError(f"SCRAM gs2 header {cbflag},{authzid}, is malformed")
        attrs = bare.split(",")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            raise ProtocolError("SCRAM client-first message must start with n=...,r=...")
        client_nonce = attrs[1][2:]
        if not client_nonce or not client_nonce.isprintable() or "," in client_nonce:
            raise ProtocolError("SCRAM client nonce is empty or not printable")
        self._gs2_header = f"{cbflag},{authzid},"
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        salt = base64.b64encode(self.secret.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self.secret.iterations}"
        return self._server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        assert self._server_first, "first() comes before final()"
        text = _text(client_final)
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        attrs = without_proof.split(",")
        if not sep or len(attrs) < 2 or not attrs[0].startswith("c=") \
                or not attrs[1].startswith("r="):
            raise ProtocolError("SCRAM client-final message must be c=...,r=...,p=...")
        if _b64(attrs[0][2:]) != self._gs2_header.encode():
            raise ProtocolError("SCRAM channel binding data does not match the gs2 header")
        if attrs[1][2:] != self._nonce:
            raise ProtocolError("SCRAM client-final nonce does not match")
        proof = _b64(proof_b64)
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}"
        signature = hmac.digest(self.secret.stored_key, auth_message.encode(), "sha256")
        if len(proof) != len(signature):
            raise ProtocolError(f"SCRAM proof is {len(proof)} bytes, not {len(signature)}")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(),
                                   self.secret.stored_key):
            raise AuthFailed("wrong password")
        server_signature = hmac.digest(self.secret.server_key, auth_message.encode(), "sha256")
        return b"v=" + base64.b64encode(server_signature)


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ProtocolError("SCRAM message is not UTF-8") from err


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ProtocolError("SCRAM message has invalid base64") from err


class AuthFailed(Exception):
    """The client's proof does not match the secret (a wrong password)."""
