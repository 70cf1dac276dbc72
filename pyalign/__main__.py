"""``python -m pyalign``: the command line of :mod:`pyalign.cli`."""

import sys

from pyalign.cli import main

sys.exit(main())
