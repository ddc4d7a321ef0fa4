"""``python -m loadtest`` is ``python -m loadtest.parity``."""

import sys

from loadtest.parity import main

sys.exit(main())
