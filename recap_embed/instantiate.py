"""Moved to the package root (``from recap_embed import instantiate, build, check_targets``).

This module re-exports the allowlisted instantiation for one release; the implementation is
``recap_embed._instantiate``. Importing it no longer rebinds ``recap_embed.instantiate``: the
root name stays the function (see ``recap_embed.__init__``).
"""

import warnings

from recap_embed._instantiate import (  # noqa: F401 - re-exported
    DEFAULT_ALLOWED_TARGETS,
    UntrustedTargetError,
    _resolve,
    build,
    check_targets,
    instantiate,
)

warnings.warn(
    "recap_embed.instantiate (the module) is deprecated: import instantiate, build, check_targets, "
    "UntrustedTargetError and DEFAULT_ALLOWED_TARGETS from recap_embed",
    DeprecationWarning,
    stacklevel=2,
)
