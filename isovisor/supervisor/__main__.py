"""``python -m isovisor.supervisor CONFIG RUN_DIR``: the detached daemon (``isovisor up
--detach`` starts it this way)."""

import sys

from isovisor.supervisor.daemon import main

sys.exit(main())
