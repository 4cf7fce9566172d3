"""``python -m recap_embed.tml``: the same command as ``recap-embed-from-tml``."""

import sys

from recap_embed.tml.cli import main

sys.exit(main())
