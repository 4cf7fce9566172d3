"""The root package's public names are what they say, however the submodules were imported."""

from __future__ import annotations

import inspect
import sys
import textwrap

import recap_embed
from launch import python_c, run

PUBLIC = [n for n in recap_embed.__all__ if n != "__version__"]


def test_all_lists_exactly_the_lazy_names() -> None:
    assert sorted(PUBLIC) == sorted(recap_embed._LAZY)
    assert len(set(recap_embed.__all__)) == len(recap_embed.__all__)
    assert isinstance(recap_embed.__version__, str)


def _check_every_public_name() -> None:
    """Each root name is the object its defining module holds: a function, a class or a constant,
    never a module (a submodule of the same name must not rebind it)."""
    import importlib

    for name in PUBLIC:
        value = getattr(recap_embed, name)
        home = importlib.import_module(recap_embed._LAZY[name])
        assert value is getattr(home, name), name
        assert not inspect.ismodule(value), f"recap_embed.{name} is a module"
        if name.isupper():
            assert isinstance(value, tuple), name  # DEFAULT_ALLOWED_TARGETS
        else:
            assert inspect.isclass(value) or inspect.isfunction(value), name
            assert value.__module__.startswith("recap_embed."), (name, value.__module__)
        assert getattr(recap_embed, name) is value, f"recap_embed.{name} changed on the second look-up"


def test_public_names_after_importing_every_submodule() -> None:
    import importlib
    import pkgutil
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the one-release re-export shims
        for info in pkgutil.walk_packages(recap_embed.__path__, "recap_embed."):
            if info.name.endswith("__main__"):
                continue  # running it would start the app
            importlib.import_module(info.name)
    _check_every_public_name()
    from recap_embed import instantiate

    assert inspect.isfunction(instantiate) and instantiate.__name__ == "instantiate"


def test_public_names_when_the_deprecated_module_is_imported_first() -> None:
    """A fresh interpreter that imports `recap_embed.instantiate` (the module) before the name."""
    code = textwrap.dedent(
        """
        import inspect, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        import recap_embed.instantiate
        from recap_embed.instantiate import build, check_targets
        from recap_embed import instantiate
        import recap_embed
        assert inspect.isfunction(instantiate), instantiate
        assert recap_embed.instantiate is instantiate
        assert recap_embed.build is build and recap_embed.check_targets is check_targets
        """
    )
    run(python_c(code), timeout=120)


def test_import_recap_embed_stays_torch_free() -> None:
    code = (
        "import sys, recap_embed, recap_embed.config, recap_embed.tml, recap_embed.tml.cli, recap_embed.hydra_guards\n"
        "heavy = sorted(m for m in ('torch', 'torchrec', 'fbgemm_gpu') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    run(python_c(code), timeout=120)


def test_moved_modules_still_import_for_one_release() -> None:
    """The old locations warn and hand out the same objects as the new ones."""
    import importlib

    import pytest

    import recap_embed.hydra_guards
    import recap_embed.tml
    import recap_embed.tml.cli

    moved = {
        "recap_embed.config.tml": (recap_embed.tml, ["from_tml", "to_tml", "write_presets", "TmlConversionError"]),
        "recap_embed.cli.from_tml": (recap_embed.tml.cli, ["main", "PROG"]),
        "recap_embed.cli.hydra_guards": (recap_embed.hydra_guards, ["install", "app_allowed_targets"]),
        "recap_embed.instantiate": (importlib.import_module("recap_embed._instantiate"), ["instantiate", "build"]),
    }
    for old, (new, names) in moved.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match="deprecated"):
            shim = importlib.import_module(old)
        for name in names:
            assert getattr(shim, name) is getattr(new, name), (old, name)
