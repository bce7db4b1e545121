"""`python -m sync`: the store's sync process (what `edge-agent sync` runs)."""

import sys

from sync.app import main

sys.exit(main())
