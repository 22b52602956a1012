"""``python -m epsdpo.cli VERB ...`` (what ``torchrun`` and ``accelerate launch`` start)."""

import sys

from epsdpo.cli import main

sys.exit(main())
