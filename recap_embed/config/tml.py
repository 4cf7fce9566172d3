"""Moved to ``recap_embed.tml`` (its own package, with the ``recap-embed-from-tml`` command).

This module re-exports the converter's public names for one release.
"""

import warnings

from recap_embed.tml import *  # noqa: F401,F403  (the same objects, one list of names)
from recap_embed.tml import __all__  # noqa: F401

warnings.warn("recap_embed.config.tml is deprecated: import from recap_embed.tml", DeprecationWarning, stacklevel=2)
