"""Migration from tml (the-algorithm-ml) embedding configs to Hydra presets, and back.

One job per module (none imports torch): `formats` (what each tml format allows), `checks`
(single values, named by their dotted path), `read` (tml -> ours), `presets` (ours -> Hydra
YAML), `export` (ours -> tml) and `cli` (the ``recap-embed-from-tml`` command).

tml has two embedding-config formats, told apart here by their content:

- the **recap** format (``projects/home/recap/embedding/config.py``, the heavy ranker's
  ``model.large_embeddings``): one collection ``optimizer`` (``init_learning_rate`` and a
  ``learning_rate`` schedule; FBGEMM exact SGD implied) and tables with ``name``,
  ``num_embeddings``, ``embedding_dim``, ``pretrained``, ``vocab``;
- the **common** format (``common/modules/embedding/config.py``, TwHIN's ``model.embeddings``): no
  collection optimizer; every table has its own ``optimizer`` (tml's ``OptimizerConfig``: one of
  ``sgd``/``adam``/``adagrad`` and a ``learning_rate``) and a ``data_type``. TwHIN's model
  (``projects/twhin/models/config.py``) adds that all tables share one dim and data type, and
  that every relation's ``lhs``/``rhs`` names a table.

tml validates its YAML with pydantic models that forbid extra keys and enforce one-of groups.
The same rules, per format, are applied while converting, so a typo fails with the dotted path
of the offending key instead of surfacing later as a silently ignored field. `to_tml` is the
inverse (in the recap format when it can express the config, else the common one), so a
conversion can be checked by a round trip.

tml expands ``$VAR``/``${VAR}`` from the environment when it loads a file; string values that
use it (vocab and snapshot paths) become ``${oc.env:VAR}`` so Hydra expands them at compose
time instead of failing on an unknown interpolation.
"""

from recap_embed.tml.export import to_tml
from recap_embed.tml.formats import (
    COMMON_FORMAT,
    RECAP_FORMAT,
    SMALL_KEY,
    STRATIFIERS_KEY,
    TML_ADAGRAD_EPS,
    TML_ADAM_BETAS,
    TML_ADAM_EPS,
    TmlConversion,
    TmlConversionError,
)
from recap_embed.tml.presets import (
    PresetExistsError,
    check_preset_name,
    default_preset_name,
    render_presets,
    write_presets,
)
from recap_embed.tml.read import from_tml, tml_format

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
