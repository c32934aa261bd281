"""Tokens and scopes (strata.common.auth): what verifies, what is refused, and why."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from strata.common.auth import (
    ADMIN_SCOPE,
    PRIVATE_KEY_FILE,
    AuthError,
    Forbidden,
    Scope,
    TokenVerifier,
    encode_token,
    generate_keypair,
    token_from_key_file,
)
from strata.common.ids import TenantId

TENANT_A = TenantId(bytes.fromhex("aa" * 16))
TENANT_B = TenantId(bytes.fromhex("bb" * 16))


@pytest.fixture
def keys(tmp_path: Path) -> tuple[bytes, TokenVerifier]:
    private, public = generate_keypair(tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    return private.read_bytes(), TokenVerifier.from_file(public)


def test_scopes_round_trip_and_cover_their_tenant(keys: tuple[bytes, TokenVerifier]) -> None:
    private, verifier = keys
    admin = verifier.verify(encode_token(private, ADMIN_SCOPE))
    assert admin.is_admin and str(admin) == "admin"
    admin.check_tenant(TENANT_A)
    admin.check_admin("listing tenants")
    tenant = verifier.verify(encode_token(private, Scope(TENANT_A)))
    assert tenant == Scope(TENANT_A) and str(tenant) == f"tenant:{TENANT_A}"
    tenant.check_tenant(TENANT_A)
    tenant.check_tenant(str(TENANT_A).upper())  # ids in paths are compared case-blind
    with pytest.raises(Forbidden, match=str(TENANT_B)):
        tenant.check_tenant(TENANT_B)
    with pytest.raises(Forbidden, match="admin"):
        tenant.check_admin("listing tenants")


def test_refused_tokens(keys: tuple[bytes, TokenVerifier], tmp_path: Path) -> None:
    private, verifier = keys
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    generate_keypair(other_dir)
    forged = token_from_key_file(other_dir / PRIVATE_KEY_FILE)
    expired = encode_token(private, ADMIN_SCOPE, expires_at=int(time.time()) - 60)
    valid = encode_token(private, ADMIN_SCOPE)
    head, body, sig = valid.split(".")
    tampered = ".".join((head, jwt.utils.base64url_encode(
        b'{"scope":"tenant:' + b"bb" * 16 + b'"}').decode(), sig))
    cases = {
        None: "authentication required",
        "": "authentication required",
        "not-a-jwt": "invalid token",
        forged: "invalid token",
        tampered: "invalid token",
        expired: "expired",
        # Other algorithms are refused even when signed correctly for them.
        jwt.encode({"scope": "admin"}, "s" * 32, algorithm="HS256"): "invalid token",
        jwt.encode({"scope": "admin"}, None,  # type: ignore[arg-type]  # alg none: no key
                   algorithm="none"): "invalid token",
        jwt.encode({"role": "admin"}, private, algorithm="EdDSA"): "invalid token",
        jwt.encode({"scope": "root"}, private, algorithm="EdDSA"): "neither",
        jwt.encode({"scope": "tenant:xyz"}, private, algorithm="EdDSA"): "bad tenant id",
        jwt.encode({"scope": 7}, private, algorithm="EdDSA"): "not a string",
    }
    for token, message in cases.items():
        with pytest.raises(AuthError, match=message):
            verifier.verify(token)
    # A live expiry is accepted.
    soon = encode_token(private, ADMIN_SCOPE, expires_at=int(time.time()) + 3600)
    assert verifier.verify(soon).is_admin


def test_key_files_missing_or_bad_say_what_to_do(tmp_path: Path) -> None:
    from strata.common.errors import UserError

    with pytest.raises(UserError, match="strata init"):
        TokenVerifier.from_file(tmp_path / "absent.pem")
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(UserError, match="not a PEM public key"):
        TokenVerifier.from_file(tmp_path / "bad.pem")
    generate_keypair(tmp_path)
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path)  # never overwrites a key pair


def test_rotation_and_retirement_without_restarting_the_verifier(tmp_path: Path) -> None:
    """A verifier made from the key set file (as a service holds it) follows `rotate` and
    `retire`: old tokens work until their key is retired, new ones from the rotation on."""
    from strata.common.auth import PUBLIC_KEY_FILE, retire_key, rotate_keys, signing_key_id
    from strata.common.errors import UserError

    private_path, _ = generate_keypair(tmp_path)
    verifier = TokenVerifier.from_file(tmp_path / PUBLIC_KEY_FILE)
    old_kid = signing_key_id(private_path.read_bytes())
    old = token_from_key_file(private_path, Scope(TENANT_A))
    assert jwt.get_unverified_header(old)["kid"] == old_kid
    legacy = jwt.encode({"scope": "admin"}, private_path.read_bytes(), algorithm="EdDSA")

    new_kid = rotate_keys(tmp_path)
    assert new_kid != old_kid and verifier.key_ids == [old_kid, new_kid]
    assert private_path.stat().st_mode & 0o777 == 0o600
    new = token_from_key_file(private_path)
    assert jwt.get_unverified_header(new)["kid"] == new_kid
    assert verifier.verify(old) == Scope(TENANT_A)
    assert verifier.verify(legacy).is_admin  # no kid: tried against every key
    assert verifier.verify(new).is_admin

    with pytest.raises(UserError, match="signs the environment's tokens"):
        retire_key(tmp_path, new_kid)
    with pytest.raises(UserError, match="no key 0123"):
        retire_key(tmp_path, "0123456789abcdef")
    retire_key(tmp_path, old_kid)
    assert verifier.key_ids == [new_kid]
    with pytest.raises(AuthError, match=f"signed with key {old_kid}, which is unknown or retired"):
        verifier.verify(old)
    with pytest.raises(AuthError, match="invalid token"):
        verifier.verify(legacy)
    assert verifier.verify(new).is_admin
    # A restarted service reads the same set.
    assert TokenVerifier.from_file(tmp_path / PUBLIC_KEY_FILE).verify(new).is_admin


def test_cached_token_is_the_signed_one_and_follows_a_rotation(tmp_path: Path) -> None:
    """`cached_token` gives what `token_from_key_file` signs, from its 0600 file once
    made; a damaged file is a miss, a rotated key signs anew."""
    from strata.common.auth import PUBLIC_KEY_FILE, cached_token, rotate_keys

    private_path, _ = generate_keypair(tmp_path)
    verifier = TokenVerifier.from_file(tmp_path / PUBLIC_KEY_FILE)
    cache = tmp_path / "cache.json"
    admin = cached_token(private_path, ADMIN_SCOPE, cache)
    assert admin == token_from_key_file(private_path)  # EdDSA: deterministic
    assert cache.stat().st_mode & 0o777 == 0o600
    tenant = cached_token(private_path, Scope(TENANT_A), cache)
    assert verifier.verify(tenant) == Scope(TENANT_A)
    # Served from the file: a token put there is what comes back.
    cache.write_text(cache.read_text().replace(admin, "from-the-cache"))
    assert cached_token(private_path, ADMIN_SCOPE, cache) == "from-the-cache"
    cache.write_text("{not json")
    assert cached_token(private_path, ADMIN_SCOPE, cache) == admin
    new_kid = rotate_keys(tmp_path)
    rotated = cached_token(private_path, ADMIN_SCOPE, cache)
    assert jwt.get_unverified_header(rotated)["kid"] == new_kid
    assert verifier.verify(rotated).is_admin and rotated != admin
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
