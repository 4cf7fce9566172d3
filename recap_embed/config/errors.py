"""Errors of the config layer: each names the config path, the bad value and what is allowed."""

from typing import List, Tuple


class ConfigError(ValueError):
    """A config that cannot be used."""


class ConfigValidationError(ConfigError):
    """Every rule a config breaks, one `path: problem` line each."""

    def __init__(self, problems: List[Tuple[str, str]]):
        self.problems = list(problems)
        lines = "\n".join(f"  {path}: {msg}" for path, msg in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"invalid config ({len(self.problems)} {noun}):\n{lines}")
