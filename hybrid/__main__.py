"""``python -m hybrid``: the ``hybrid`` command line (what ``torchrun -m hybrid`` starts in each process)."""

import sys

from hybrid.cli.main import main

sys.exit(main())
