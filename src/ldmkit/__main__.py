"""`python -m ldmkit ...` (and `torchrun -m ldmkit ...`) runs the `ldmkit` command."""

import sys

from ldmkit.cli import main

sys.exit(main())
