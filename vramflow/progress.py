"""In-process progress listeners, so a CLI can draw a bar for a flow running in its process."""

from __future__ import annotations

from collections.abc import Callable

Listener = Callable[[str, int, int], None]  # (document name, pages finished, pages planned)
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> None:
    _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def publish(document: str, finished: int, planned: int) -> None:
    for listener in list(_listeners):
        listener(document, finished, planned)
