"""Run the console: `python -m strata.console --repo-dir ENV` (what `strata start` starts
in the background; `strata console` runs it in the foreground). Host and port come from
the environment's config.toml `[console]`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from strata.common.errors import StrataError
from strata.common.logctx import setup_logging
from strata.console.server import serve
from strata.control.auth_setup import export_cli_token
from strata.control.env import Environment


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m strata.console",
                                     description="Strata's web console (docs/console.md)")
    parser.add_argument("--repo-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        env = Environment.open(args.repo_dir.absolute())
        config = env.config()
        export_cli_token(env, config)  # its calls to the services carry a token (auth on)
        asyncio.run(serve(env, config.console.host, config.console.port))
    except StrataError as err:
        print(f"strata console: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
