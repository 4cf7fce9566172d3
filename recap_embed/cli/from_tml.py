"""Moved to ``recap_embed.tml.cli`` (the ``recap-embed-from-tml`` command); re-exported for one release."""

import sys
import warnings

from recap_embed.tml.cli import PROG, main

__all__ = ["PROG", "main"]

if __name__ == "__main__":
    sys.exit(main())

warnings.warn("recap_embed.cli.from_tml is deprecated: use recap_embed.tml.cli", DeprecationWarning, stacklevel=2)
