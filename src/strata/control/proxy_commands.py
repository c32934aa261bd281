"""The `strata role` and `strata proxy` commands (added to the CLI by
`strata.control.commands.register`).

Roles are per branch: the control plane keeps each role's SCRAM secret (never the
password) for the proxy, which authenticates clients with it; the role itself lives in
the branch's catalog, created (or its password set) on the branch's primary when it runs,
else at its next start. A new branch inherits its parent's roles, as its catalog does.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import click

from strata.common.errors import UserError
from strata.control import output
from strata.control.endpoints import apply_roles, running_pid
from strata.control.env import DEFAULT_BRANCH, Environment
from strata.control.proxy import start_proxy, stop_proxy

RESERVED_ROLES = ("postgres",)


def _env(ctx: click.Context) -> Environment:
    root = ctx.find_root().obj
    assert isinstance(root, Path), root
    return Environment.open(root)


def _check_role_name(name: str) -> str:
    if name in RESERVED_ROLES or name.startswith("pg_"):
        raise UserError(f"role {name!r} is reserved (the superuser stays Strata's own, D8); "
                        "pick another name")
    if not name or len(name) > 63 or not name.isprintable() or '"' in name:
        raise UserError(f"invalid role name {name!r}: 1 to 63 printable characters, no '\"'")
    return name


def _read_password(password: str | None, from_stdin: bool) -> tuple[str, bool]:
    """(password, generated)."""
    if from_stdin:
        text = sys.stdin.readline().rstrip("\n")
        if not text:
            raise UserError("--password-stdin read an empty line; give the password on stdin")
        return text, False
    if password is not None:
        return password, False
    return secrets.token_urlsafe(18), True


branch_option = click.option("--branch", default=DEFAULT_BRANCH, show_default=True,
                             help="The branch whose role it is.")
tenant_option = click.option("--tenant", metavar="NAME|ID",
                             help="Tenant (default: the environment's default tenant).")
password_options = [
    click.option("--password", metavar="TEXT",
                 help="The password (default: a random one, printed once). Visible to "
                      "other users in the process list: prefer --password-stdin."),
    click.option("--password-stdin", "password_stdin", is_flag=True,
                 help="Read the password from the first line of stdin."),
]


def _with_password_options(f: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(password_options):
        f = option(f)
    return f


@click.group()
def role() -> None:
    """Roles that log in through the proxy (SCRAM-SHA-256), per branch."""


def _set_role(ctx: click.Context, name: str, branch: str, tenant: str | None,
              password: str | None, password_stdin: bool, *, create: bool) -> None:
    env = _env(ctx)
    _check_role_name(name)
    text, generated = _read_password(password, password_stdin)
    # Imported here: scramp (and its asn1crypto) is slow to import, and every command
    # (`endpoint start` included) loads this module.
    from strata.proxy.scram import ScramSecret

    secret = str(ScramSecret.from_password(text))
    with env.locked() as state:
        tid = state.tenant_id(tenant)
        state.timeline_id(tid, branch)  # NotFound for an unknown branch
        roles = state.tenants[tid].roles.setdefault(branch, {})
        if create and name in roles:
            raise UserError(f"role {name!r} exists on branch {branch}; change its password "
                            f"with `strata role password {name} --branch {branch}`")
        if not create and name not in roles:
            raise UserError(f"no role {name!r} on branch {branch}; create it with `strata "
                            f"role create {name} --branch {branch}`")
        roles[name] = secret
        primaries = [ep for ep in state.endpoints.values()
                     if ep.tenant_id == tid and ep.branch == branch and not ep.read_only]
    for ep in primaries:
        if running_pid(env, ep.name) is not None:
            with output.step(f"setting role {name} on endpoint {ep.name}"):
                apply_roles(env, ep, {name: secret})
    verb = "created" if create else "changed the password of"
    output.result(f"{verb} role {name} on branch {branch}")
    if generated:
        output.result(f"password: {text}")


@role.command("create")
@click.argument("name")
@branch_option
@tenant_option
@_with_password_options
@click.pass_context
def role_create(ctx: click.Context, name: str, branch: str, tenant: str | None,
                password: str | None, password_stdin: bool) -> None:
    """Create role NAME on a branch (or take over an existing PostgreSQL role, such as
    `strata`, by giving it a password)."""
    _set_role(ctx, name, branch, tenant, password, password_stdin, create=True)


@role.command("password")
@click.argument("name")
@branch_option
@tenant_option
@_with_password_options
@click.pass_context
def role_password(ctx: click.Context, name: str, branch: str, tenant: str | None,
                  password: str | None, password_stdin: bool) -> None:
    """Set a new password for role NAME on a branch."""
    _set_role(ctx, name, branch, tenant, password, password_stdin, create=False)


@role.command("list")
@branch_option
@tenant_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
@click.pass_context
def role_list(ctx: click.Context, branch: str, tenant: str | None, as_json: bool) -> None:
    """The roles of a branch (names only: secrets stay in the state file)."""
    state = _env(ctx).read_state()
    tid = state.tenant_id(tenant)
    state.timeline_id(tid, branch)
    names = sorted(state.tenants[tid].roles.get(branch, {}))
    if as_json:
        output.print_json([{"branch": branch, "role": n} for n in names])
        return
    output.table(f"roles of branch {branch}", ["role"], [[n] for n in names])


@click.group()
def proxy() -> None:
    """The proxy: one PostgreSQL port (TLS) for every endpoint; wakes and suspends them.
    `strata start` starts it and `strata stop` stops it."""


@proxy.command("start")
@click.pass_context
def proxy_start(ctx: click.Context) -> None:
    env = _env(ctx)
    pid = start_proxy(env, env.config())
    output.result(f"proxy running (pid {pid})")


@proxy.command("stop")
@click.pass_context
def proxy_stop(ctx: click.Context) -> None:
    stopped = stop_proxy(_env(ctx))
    output.result("proxy stopped" if stopped else "proxy was not running")
