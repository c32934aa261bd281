"""JWT authentication: Ed25519 keys, tokens with a scope, and the check of a scope.

A token is a JWT signed with EdDSA (Ed25519) whose claims are

    {"scope": "admin"}                       everything (Strata's own processes, the CLI)
    {"scope": "tenant:<tenant_id hex>"}      only routes and commands of that tenant
    "exp": <unix seconds>                    optional expiry

`strata init` makes the key pair in the environment directory (`auth_private_key.pem`,
0600, kept by the control plane; `auth_public_key.pem`, given to each service). A
service started with a public key refuses requests without a valid token (401 on HTTP,
FATAL 28P01 on its pg port) and requests of the wrong scope (403, 42501). Clients take
their token as an argument or from `$STRATA_AUTH_TOKEN` (`default_token()`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strata.common.errors import StrataError, UserError
from strata.common.ids import TenantId

# jwt and cryptography are imported where used: they add ~0.1 s to every `strata` command
# otherwise, and most never sign or verify a token.

PRIVATE_KEY_FILE = "auth_private_key.pem"
PUBLIC_KEY_FILE = "auth_public_key.pem"
TOKEN_ENV = "STRATA_AUTH_TOKEN"
ALGORITHM = "EdDSA"
ADMIN = "admin"
TENANT_PREFIX = "tenant:"


class AuthError(StrataError):
    """Missing or invalid credentials (HTTP 401, SQLSTATE 28P01)."""


class Forbidden(StrataError):
    """Valid credentials whose scope does not cover the request (HTTP 403, 42501)."""


@dataclass(frozen=True, slots=True)
class Scope:
    """What a token allows: everything (`tenant_id` None) or one tenant."""

    tenant_id: TenantId | None = None

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None

    def __str__(self) -> str:
        return ADMIN if self.tenant_id is None else f"{TENANT_PREFIX}{self.tenant_id}"

    @classmethod
    def parse(cls, text: str) -> Scope:
        if text == ADMIN:
            return cls()
        if text.startswith(TENANT_PREFIX):
            try:
                return cls(TenantId(TenantId.parse(text[len(TENANT_PREFIX):]).raw))
            except (ValueError, StrataError) as err:
                raise AuthError(f"token scope {text[:80]!r}: bad tenant id ({err})") from err
        raise AuthError(f"token scope {text[:80]!r} is neither 'admin' nor 'tenant:<id>'")

    def check_tenant(self, tenant_id: TenantId | str) -> None:
        """Forbidden unless this scope covers `tenant_id` (text compared as given)."""
        if self.tenant_id is None or str(self.tenant_id) == str(tenant_id).lower():
            return
        raise Forbidden(f"a token for {self} may not act on tenant {str(tenant_id)[:40]}")

    def check_admin(self, what: str) -> None:
        if self.tenant_id is not None:
            raise Forbidden(f"{what} needs an admin token; this one is for {self}")


ADMIN_SCOPE = Scope()


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into `directory` (private key mode 0600);
    returns (private_path, public_path)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path = directory / PRIVATE_KEY_FILE
    public_path = directory / PUBLIC_KEY_FILE
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _read_key(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read the auth {what} key {path}: {err.strerror}; "
                        f"`strata init` makes one (or init with --no-auth)") from err


def encode_token(private_key_pem: bytes, scope: Scope, *, expires_at: int | None = None) -> str:
    """A signed token for `scope` (no expiry unless `expires_at`, Unix seconds)."""
    import jwt

    claims: dict[str, Any] = {"scope": str(scope)}
    if expires_at is not None:
        claims["exp"] = expires_at
    return jwt.encode(claims, private_key_pem, algorithm=ALGORITHM)


def token_from_key_file(private_key_path: Path, scope: Scope = ADMIN_SCOPE) -> str:
    return encode_token(_read_key(private_key_path, "private"), scope)


class TokenVerifier:
    """Checks tokens against one public key (what a service holds)."""

    def __init__(self, public_key_pem: bytes) -> None:
        from cryptography.hazmat.primitives import serialization

        try:
            self._key = serialization.load_pem_public_key(public_key_pem)
        except ValueError as err:
            raise UserError(f"the auth public key is not a PEM public key: {err}") from err

    @classmethod
    def from_file(cls, path: Path) -> TokenVerifier:
        return cls(_read_key(path, "public"))

    def verify(self, token: str | None) -> Scope:
        """The token's scope; AuthError if it is missing, malformed, forged or expired."""
        import jwt

        if not token:
            raise AuthError("authentication required: send a token (Authorization: Bearer "
                            f"<token> on HTTP, the password on pg ports; ${TOKEN_ENV})")
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM],  # type: ignore[arg-type]
                                options={"require": ["scope"]})
        except jwt.ExpiredSignatureError as err:
            raise AuthError("the token has expired; make a new one with `strata auth "
                            "token`") from err
        except jwt.InvalidTokenError as err:
            raise AuthError(f"invalid token: {err}") from err
        scope = claims.get("scope")
        if not isinstance(scope, str):
            raise AuthError("invalid token: its 'scope' claim is not a string")
        return Scope.parse(scope)


def default_token() -> str | None:
    """The token in `$STRATA_AUTH_TOKEN`, or None."""
    return os.environ.get(TOKEN_ENV) or None


def auth_headers(token: str | None) -> dict[str, str]:
    """The HTTP request headers that carry `token` (none without one). Here rather than
    in `strata.common.http_auth` so that clients do not import aiohttp."""
    return {"Authorization": f"Bearer {token}"} if token else {}
