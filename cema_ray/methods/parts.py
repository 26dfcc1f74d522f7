"""A publication in parts: one flat state holding several trainers' or students' parameters under prefixes.

Two things split what the cloud publishes: lanes (`method.lanes: group`, one trainer per edge group, prefix
``lane.<i>.``) and edge architectures (`edges.groups[i].model`, one student per architecture, prefix ``model.<k>.``).
A host gets one publication for all its edges, and each edge loads only its own part (`view`); the bytes an edge is
charged are its part's, what a cloud addressing each part's edges would send them.
"""
from __future__ import annotations

from typing import Mapping

from cema_ray.methods.base import NormState

LANE = "lane."
MODEL = "model."

_VIEWS: dict[tuple[int, str], tuple[NormState, NormState | None]] = {}


def wire(parts: Mapping[int, NormState], kind: str) -> NormState:
    """The parts as one flat publication: ``<kind><index>.<parameter>``."""
    return {f"{kind}{index}.{name}": value for index, state in sorted(parts.items())
            for name, value in state.items()}


def view(state: NormState, kind: str, index: int) -> NormState | None:
    """Part ``index`` of a publication (None: the publication has nothing new for it). The view is made once per
    publication and part, so the edges of one part on a host hold the same object (their forwards stack)."""
    prefix = f"{kind}{index}."
    hit = _VIEWS.get((id(state), prefix))
    if hit is not None and hit[0] is state:
        return hit[1]
    part = {name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)} or None
    _VIEWS[(id(state), prefix)] = (state, part)
    while len(_VIEWS) > 64:
        _VIEWS.pop(next(iter(_VIEWS)))
    return part
