"""Entry point: `python -m strata.proxy --repo-dir DIR` (started by `strata start`)."""

import sys

from strata.proxy.main import main

sys.exit(main())
