"""``python -m validation.autotune``: see validation/autotune/cli.py."""

import sys

from validation.autotune.cli import main

sys.exit(main())
