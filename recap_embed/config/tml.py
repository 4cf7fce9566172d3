"""Moved to ``recap_embed.tml`` (its own package, with the ``recap-embed-from-tml`` command).

This module re-exports the converter's public names for one release.
"""

import warnings

from recap_embed.tml import (
    COMMON_FORMAT,
    RECAP_FORMAT,
    SMALL_KEY,
    STRATIFIERS_KEY,
    TML_ADAGRAD_EPS,
    TML_ADAM_BETAS,
    TML_ADAM_EPS,
    PresetExistsError,
    TmlConversion,
    TmlConversionError,
    check_preset_name,
    default_preset_name,
    from_tml,
    render_presets,
    tml_format,
    to_tml,
    write_presets,
)

__all__ = [
    "COMMON_FORMAT",
    "RECAP_FORMAT",
    "SMALL_KEY",
    "STRATIFIERS_KEY",
    "TML_ADAGRAD_EPS",
    "TML_ADAM_BETAS",
    "TML_ADAM_EPS",
    "PresetExistsError",
    "TmlConversion",
    "TmlConversionError",
    "check_preset_name",
    "default_preset_name",
    "from_tml",
    "render_presets",
    "tml_format",
    "to_tml",
    "write_presets",
]

warnings.warn("recap_embed.config.tml is deprecated: import from recap_embed.tml", DeprecationWarning, stacklevel=2)
