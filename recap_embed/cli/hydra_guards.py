"""Moved to ``recap_embed.hydra_guards`` (beside ``recap_embed.errors``: both Hydra apps use it).

For one release this name is the moved module itself, so its settings are shared.
"""

import sys
import warnings

from recap_embed import hydra_guards

warnings.warn("recap_embed.cli.hydra_guards is deprecated: use recap_embed.hydra_guards", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = hydra_guards
