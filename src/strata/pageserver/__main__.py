"""Entry point: `python -m strata.pageserver --workdir DIR [-c key=value ...]`."""

import sys

from strata.pageserver.server import main

sys.exit(main())
