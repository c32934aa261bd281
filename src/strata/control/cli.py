"""`strata`: the command-line tool (a click group; each command is added here)."""

from __future__ import annotations

import sys

import click

from strata.common.errors import StrataError
from strata.common.lsn import Lsn


@click.group()
def main() -> None:
    """Strata: serverless PostgreSQL on a versioned page store."""


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
