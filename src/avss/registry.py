"""Name-to-class registries filled by class decorators (tasks, layer-importance scorers).

Both are looked up by the names users type (``avss eval --tasks``, ``avss prune --method``), so both need
the same guarantees: the class learns its registered name, and a second class claiming a name is an error
at import time rather than a silent replacement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

C = TypeVar("C", bound=type)


def class_registrar(registry: dict[str, Any], kind: str) -> Callable[[str], Callable[[C], C]]:
    """A ``@register(name)`` class decorator that adds classes to ``registry`` (``kind`` names them in
    errors)."""

    def register(name: str) -> Callable[[C], C]:
        def decorator(cls: C) -> C:
            if name in registry:
                raise ValueError(f"{kind} {name!r} is already registered by {registry[name].__qualname__}")
            cls.name = name
            registry[name] = cls
            return cls

        return decorator

    return register
