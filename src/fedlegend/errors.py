"""The one base class of user errors: what the user can fix (config, files, models, data).

The CLI catches exactly these (plus FileExistsError, an output folder or key that exists)
and prints one line, `fedlegend: error: MESSAGE`, whose message names the file, line or
field and the fix; `fedlegend --debug ...` prints the traceback too. Every other exception
is a programming error and keeps its traceback.

    UserError
      config.ConfigError   (also a ValueError)   a config file, key or value
      assets.AssetError    (also a RuntimeError) a model or dataset that cannot be found or read
      data.DataError       (also a ValueError)   data that cannot be split or partitioned
      MethodNameError      (also a ValueError)   a method name not in the registry (methods.check_method)
      ModelError           (also a ValueError)   a model whose LoRA targets or head cannot be found

Each subclass keeps the built-in base it had before, so `except ValueError` elsewhere (and
pydantic validators, which turn a ValueError into a validation error) work as they did.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user gave (config, files, models, data); the message says what and how to fix it."""


class MethodNameError(UserError, ValueError):
    """A method name that is not registered; the message lists those that are."""


class ModelError(UserError, ValueError):
    """A model fedlegend cannot adapt (no LoRA targets, no task head); the message names the config key to set."""
