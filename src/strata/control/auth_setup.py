"""The control plane's side of JWT auth: keys at init, and which token each process gets.

With `auth = true` in config.toml (the default of `strata init`), the environment holds
the key pair (strata.common.auth). The `strata` process signs an admin token for its own
clients unless `$STRATA_AUTH_TOKEN` is already set (then it uses that one); the services
it starts get an admin token (the pageserver streams every tenant's WAL from the
safekeepers), an endpoint's walproposer a token for the endpoint's tenant only. Tokens
travel in the child's environment, never on a command line.
"""

from __future__ import annotations

import os

from strata.common.auth import (
    ADMIN_SCOPE,
    TOKEN_CACHE_FILE,
    TOKEN_ENV,
    Scope,
    cached_token,
    generate_keypair,
)
from strata.common.errors import UserError
from strata.common.ids import TenantId
from strata.control.env import EnvConfig, Environment


def make_keys(env: Environment) -> None:
    """Write the environment's key pair (init)."""
    generate_keypair(env.root)


def token_for(env: Environment, config: EnvConfig, scope: Scope = ADMIN_SCOPE) -> str | None:
    """A token of `scope` signed with the environment's key; None when auth is off."""
    if not config.auth:
        return None
    if not env.auth_private_key.is_file():
        raise UserError(f"config auth = true but {env.auth_private_key} is missing; restore "
                        "it, or set auth = false in the config (docs/auth.md)")
    return cached_token(env.auth_private_key, scope, env.root / TOKEN_CACHE_FILE)


def export_cli_token(env: Environment, config: EnvConfig) -> None:
    """Give this `strata` process's clients a token: `$STRATA_AUTH_TOKEN` if set, else an
    admin token of the environment."""
    if config.auth and not os.environ.get(TOKEN_ENV):
        token = token_for(env, config)
        assert token is not None
        os.environ[TOKEN_ENV] = token


def child_env(env: Environment, config: EnvConfig,
              tenant_id: TenantId | None = None) -> dict[str, str]:
    """The environment of a process the control plane starts: an admin token, or a token
    for `tenant_id` only; without auth, no token at all."""
    out = dict(os.environ)
    out.pop(TOKEN_ENV, None)
    token = token_for(env, config, Scope(tenant_id))
    if token is not None:
        out[TOKEN_ENV] = token
    return out


def public_key_path(env: Environment, config: EnvConfig) -> str | None:
    """The public key a service checks tokens with; None when auth is off."""
    if not config.auth:
        return None
    if not env.auth_public_key.is_file():
        raise UserError(f"config auth = true but {env.auth_public_key} is missing; restore "
                        "it, or set auth = false in the config (docs/auth.md)")
    return str(env.auth_public_key)
