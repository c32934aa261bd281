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

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strata.common.durable import write_atomic
from strata.common.errors import StrataError, UserError
from strata.common.ids import TenantId

# jwt and cryptography are imported where used: they add ~0.1 s to every `strata` command
# otherwise, and most never sign or verify a token.

PRIVATE_KEY_FILE = "auth_private_key.pem"
PUBLIC_KEY_FILE = "auth_public_key.pem"
TOKEN_CACHE_FILE = "auth_token_cache.json"
TOKEN_ENV = "STRATA_AUTH_TOKEN"
ALGORITHM = "EdDSA"
ADMIN = "admin"
TENANT_PREFIX = "tenant:"

log = logging.getLogger(__name__)


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


def key_id(public_key: Any) -> str:
    """A public key's id, the `kid` of the tokens it verifies: the first 16 hex digits of
    the SHA-256 of its raw 32 bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _new_key() -> tuple[bytes, bytes]:
    """A new Ed25519 key: (private PEM, public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into `directory` (private key mode 0600); the public
    key file is a key set of one. Returns (private_path, public_path)."""
    private_pem, public_pem = _new_key()
    private_path = directory / PRIVATE_KEY_FILE
    public_path = directory / PUBLIC_KEY_FILE
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _pem_blocks(text: bytes) -> list[bytes]:
    marker = b"-----BEGIN "
    return [marker + part.strip() + b"\n" for part in text.split(marker)[1:]]


def load_key_set(public_keys_pem: bytes) -> dict[str, Any]:
    """The public keys of a key set file (PEM blocks, one per key) by key id."""
    from cryptography.hazmat.primitives import serialization

    keys: dict[str, Any] = {}
    for block in _pem_blocks(public_keys_pem):
        try:
            key = serialization.load_pem_public_key(block)
        except ValueError as err:
            raise UserError(f"the auth public key is not a PEM public key: {err}") from err
        keys[key_id(key)] = key
    if not keys:
        raise UserError("the auth public key is not a PEM public key: the file holds no "
                        "PEM block")
    return keys


def signing_key_id(private_key_pem: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_key_pem, password=None)
    return key_id(key.public_key())


def rotate_keys(directory: Path) -> str:
    """Make a new signing key: its public key joins the key set first (services accept
    it before any token carries it), then it replaces the private key. Tokens of the old
    keys stay valid until `retire_key`. Returns the new key id."""
    private_path = directory / PRIVATE_KEY_FILE
    public_path = directory / PUBLIC_KEY_FILE
    current = _read_key(public_path, "public")
    private_pem, public_pem = _new_key()
    write_atomic(public_path, current.rstrip(b"\n") + b"\n" + public_pem)
    write_atomic(private_path, private_pem, mode=0o600)
    return signing_key_id(private_pem)


def retire_key(directory: Path, kid: str) -> None:
    """Remove key `kid` from the key set: tokens it signed are refused from then on. The
    key that signs new tokens cannot be retired (rotate first)."""
    from cryptography.hazmat.primitives import serialization

    public_path = directory / PUBLIC_KEY_FILE
    if kid == signing_key_id(_read_key(directory / PRIVATE_KEY_FILE, "private")):
        raise UserError(f"key {kid} signs the environment's tokens; `strata auth rotate` "
                        "first, then retire it")
    blocks = _pem_blocks(_read_key(public_path, "public"))
    kept = [b for b in blocks if key_id(serialization.load_pem_public_key(b)) != kid]
    if len(kept) == len(blocks):
        raise UserError(f"no key {kid} in {public_path}; `strata auth keys` lists them")
    write_atomic(public_path, b"".join(kept))


def _read_key(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read the auth {what} key {path}: {err.strerror}; "
                        f"`strata init` makes one (or init with --no-auth)") from err


def encode_token(private_key_pem: bytes, scope: Scope, *, expires_at: int | None = None) -> str:
    """A signed token for `scope` (no expiry unless `expires_at`, Unix seconds); its
    header names the signing key (`kid`)."""
    import jwt

    claims: dict[str, Any] = {"scope": str(scope)}
    if expires_at is not None:
        claims["exp"] = expires_at
    return jwt.encode(claims, private_key_pem, algorithm=ALGORITHM,
                      headers={"kid": signing_key_id(private_key_pem)})


def token_from_key_file(private_key_path: Path, scope: Scope = ADMIN_SCOPE) -> str:
    return encode_token(_read_key(private_key_path, "private"), scope)


def cached_token(private_key_path: Path, scope: Scope, cache_path: Path) -> str:
    """`token_from_key_file`'s token, kept in `cache_path` (mode 0600, beside the key).

    A token without expiry of one key and scope never changes (EdDSA signatures are
    deterministic, the claims and header are fixed), so it is signed once per key and
    scope: signing imports PyJWT and cryptography, ~0.15 s of CPU that every `strata`
    command (an endpoint start among them) paid before. Entries are kept under the
    SHA-256 of the private key file: a rotated key signs anew. A cache that cannot be
    read or written is only a miss."""
    private_pem = _read_key(private_key_path, "private")
    digest = hashlib.sha256(private_pem).hexdigest()
    tokens: dict[str, str] = {}
    try:
        cache = json.loads(cache_path.read_bytes())
        if cache["key_sha256"] == digest:
            tokens = {str(k): str(v) for k, v in cache["tokens"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    token = tokens.get(str(scope))
    if token is not None:
        return token
    token = encode_token(private_pem, scope)
    tokens[str(scope)] = token
    temp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
    try:  # not fsynced: a cache lost in a crash is signed again
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps({"key_sha256": digest, "tokens": tokens}).encode())
        os.replace(temp, cache_path)
    except OSError as err:
        log.debug("token cache %s not written: %s", cache_path, err)
        with contextlib.suppress(OSError):
            temp.unlink()
    return token


def _file_identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class TokenVerifier:
    """Checks tokens against a key set (what a service holds). Made `from_file`, it reads
    the file again when it changed (`strata auth rotate` / `retire`): no restart needed.
    A file that became unreadable or invalid keeps the last good set (logged once)."""

    def __init__(self, public_keys_pem: bytes, path: Path | None = None) -> None:
        self._keys = load_key_set(public_keys_pem)
        self._path = path
        self._identity = _file_identity(path) if path is not None else None

    @classmethod
    def from_file(cls, path: Path) -> TokenVerifier:
        identity = _file_identity(path)
        verifier = cls(_read_key(path, "public"), path)
        verifier._identity = identity  # the stat before the read: a change in between is read again
        return verifier

    @property
    def key_ids(self) -> list[str]:
        self._reload_if_changed()
        return list(self._keys)

    def _reload_if_changed(self) -> None:
        if self._path is None:
            return
        identity = _file_identity(self._path)
        if identity == self._identity:
            return
        self._identity = identity
        try:
            self._keys = load_key_set(_read_key(self._path, "public"))
        except UserError as err:
            log.warning("keeping the previous auth keys: %s", err)

    def verify(self, token: str | None) -> Scope:
        """The token's scope; AuthError if it is missing, malformed, forged, expired or
        signed with a key not in the set."""
        import jwt

        if not token:
            raise AuthError("authentication required: send a token (Authorization: Bearer "
                            f"<token> on HTTP, the password on pg ports; ${TOKEN_ENV})")
        self._reload_if_changed()
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as err:
            raise AuthError(f"invalid token: {err}") from err
        if kid is None:
            candidates = list(self._keys.values())  # a token made before key ids
        elif kid in self._keys:
            candidates = [self._keys[kid]]
        else:
            raise AuthError(f"invalid token: signed with key {kid!s:.16}, which is unknown or "
                            "retired here; make a new one with `strata auth token`")
        claims: dict[str, Any] | None = None
        for key in candidates:
            try:
                claims = jwt.decode(token, key, algorithms=[ALGORITHM],
                                    options={"require": ["scope"]})
                break
            except jwt.InvalidSignatureError as err:
                if key is candidates[-1]:
                    raise AuthError(f"invalid token: {err}") from err
            except jwt.ExpiredSignatureError as err:
                raise AuthError("the token has expired; make a new one with `strata auth "
                                "token`") from err
            except jwt.InvalidTokenError as err:
                raise AuthError(f"invalid token: {err}") from err
        assert claims is not None
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
