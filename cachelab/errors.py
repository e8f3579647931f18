"""The errors a user can fix. Each is printed as one line, without a traceback; this module
imports nothing, so every layer can raise them."""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (config, missing files); printed as one line, no traceback."""


class ConfigError(UserError, ValueError):
    """A bad configuration value or combination."""


class WeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights could not be loaded; the message names them and the fix."""


class AssetCorrupt(UserError, RuntimeError):
    """A shipped weights file is missing or does not match its manifest's sha256."""


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint file that cannot be read, or holds weights of another architecture."""


class NonFiniteError(UserError, FloatingPointError):
    """A forecast holds NaN or Inf (``guard=raise``); the message names the step, the site and the context."""


class FolderLocked(UserError, RuntimeError):
    """Another run holds the folder's lock file; the message names the file and its pid."""


class ArgumentError(ConfigError):
    """A constructor argument outside what it allows: ``key`` is the argument's name, and the
    config layer names the config key that gave it (:meth:`renamed`)."""

    def __init__(self, key: str, value, allowed: str, problem: str = "is out of range"):
        self.key, self.value, self.allowed, self.problem = key, value, allowed, problem
        super().__init__(f"{key}={value!r} {problem}; allowed: {allowed}")

    def renamed(self, key: str) -> ArgumentError:
        """The same refusal for the config key ``key``."""
        return ArgumentError(key, self.value, self.allowed, self.problem)
