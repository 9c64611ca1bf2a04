"""`python -m training.cli …`: the `metatrainer` command."""

import sys

from training.cli.main import main

sys.exit(main())
