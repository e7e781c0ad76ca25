"""Per-daemon settings: the ``settings:`` section of a rule file and the model that checks it.

Rules say what to do with a message; settings say how the daemon finds out about it (the
DNSBL zones and their weights, clamd's address, greylisting's delay and store). Both live
in the daemon's one rule file, so an operator edits, checks, tests and reloads them
together.

A daemon's policy module, ``mailgate.policies.<daemon>``, declares its settings as a
pydantic model named ``Settings`` whose every field has a default. A daemon without such a
module or model takes no settings.
"""

from __future__ import annotations

import importlib
import importlib.util

from pydantic import BaseModel


def settings_model(daemon: str) -> type[BaseModel] | None:
    """The ``Settings`` model of ``daemon``'s policy module, or None if it takes none."""
    module_name = f"mailgate.policies.{daemon}"
    if importlib.util.find_spec(module_name) is None:
        return None
    module = importlib.import_module(module_name)
    model = getattr(module, "Settings", None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    return None
