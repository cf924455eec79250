"""``python -m fastmeta.train ...``: the CLI (:func:`fastmeta.train.main`)."""
import sys

from fastmeta.train.cli import main

sys.exit(main())
