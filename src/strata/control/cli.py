"""`strata`: the command-line tool (a click group; the environment commands are in
`strata.control.commands`, added at the end of this module)."""

from __future__ import annotations

import gc
import os
import sys

# The imports below build ~60 dataclasses and hundreds of functions and classes, which
# live as long as the process, and leave next to no garbage: the cyclic collector, which
# allocation counts trigger, ran ~45 times during them for nothing. It is off until the
# end of this module, where what they built is moved out of its reach (`gc.freeze`).
gc.disable()

if os.path.basename(sys.argv[0]) == "strata":
    # `strata endpoint start`: the lazy FUSE server's Python start overlaps this
    # program's imports (the mount waits for it; strata.compute.fuse_early).
    from strata.compute import fuse_early

    if fuse_early.wanted(sys.argv[1:]):
        fuse_early.spawn()

from typing import Any  # noqa: E402

import click  # noqa: E402

from strata.common.errors import StrataError  # noqa: E402
from strata.common.lsn import Lsn  # noqa: E402
from strata.control import output  # noqa: E402
from strata.control.env import DEFAULT_REPO_DIR, REPO_DIR_ENV, repo_dir_from  # noqa: E402


class _Group(click.Group):
    """Reports a StrataError as `strata: error: ...` and exit code 1, without a traceback.
    A command that succeeded and asked for it (`output.exit_fast`) ends the process
    without Python's teardown (~0.03 s of CPU, several times that on a busy machine, that
    a script waiting for `endpoint start` would wait for), once its output is flushed;
    only when run as the `strata` program (in-process callers pass `args`)."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        try:
            return super().main(args, *rest, **kwargs)
        except SystemExit as err:
            if args is None and err.code in (None, 0) and output.exit_fast:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            raise

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except StrataError as err:
            click.echo(f"strata: error: {err}", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
@click.option("--repo-dir", type=click.Path(file_okay=False), envvar=REPO_DIR_ENV,
              help=f"The environment directory (default ./{DEFAULT_REPO_DIR}; "
                   f"also ${REPO_DIR_ENV}).")
@click.pass_context
def main(ctx: click.Context, repo_dir: str | None) -> None:
    """Strata: serverless PostgreSQL on a versioned page store."""
    ctx.obj = repo_dir_from(repo_dir)


def _parse_lsn(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Lsn | None:
    if value is None:
        return None
    try:
        return Lsn.parse(value)
    except StrataError as err:
        raise click.BadParameter(str(err)) from None


@main.command()
@click.option("--start", "-s", callback=_parse_lsn, metavar="LSN",
              help="First record to print: the first one that begins at or after LSN.")
@click.option("--end", "-e", callback=_parse_lsn, metavar="LSN",
              help="Stop before the first record that begins at or after LSN.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
def waldump(start: Lsn | None, end: Lsn | None, paths: tuple[str, ...]) -> None:
    """Print the WAL records in segment files or directories PATH..., one per line.

    The format is pg_waldump -b's: the record line (without pg_waldump's description text;
    the record type is printed instead), then one line per block reference.
    """
    from strata.pg.waldump import format_record
    from strata.pg.walreader import read_wal_files

    out = sys.stdout
    try:
        for record in read_wal_files(list(paths), start, end):
            out.write(format_record(record))
            out.write("\n")
    except StrataError as err:
        out.flush()
        click.echo(f"strata waldump: error: {err}", err=True)
        sys.exit(1)


def _register() -> None:
    from strata.control import commands

    commands.register(main)


_register()
gc.freeze()
gc.enable()
