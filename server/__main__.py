"""``python -m emserve.server ARGS``: the ``emserve`` command (:func:`emserve.server.cli.main`)."""

import sys

from emserve.server.cli import main

sys.exit(main())
