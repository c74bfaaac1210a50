"""``python -m afmfast``: the command line."""
import sys

from afmfast.cli import main

sys.exit(main())
