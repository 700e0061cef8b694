"""Fitness plugins: which per-sample reward a run scores its members with (``es.fitness``).

``logprob`` is built in (paper Eq. 2–3, ``es/fitness.py``). Any other name is a Python entry point
in the group ``ea4llm_pool.fitness``, registered by a package installed on this machine::

    [project.entry-points."ea4llm_pool.fitness"]
    my-reward = "my_package.rewards:my_reward"      # fn(model, ids, mask) -> fp32 tensor [B]

The safety rule: a config holds a plugin's *name*, never an import path, and :func:`load` imports
only the object an installed entry point of that name points to. So a coordinator's config can make
a worker run only code its owner chose to install; a worker that lacks the plugin is refused when
it registers (HELLO lists :func:`available`), or fails to build its replica, with the reason.
"""

from __future__ import annotations

from importlib import metadata
from typing import Callable

from . import UserError
from .config import FITNESS_NAME
from .es.fitness import sample_rewards

GROUP = "ea4llm_pool.fitness"
BUILTIN = "logprob"


def _registered() -> dict[str, list[metadata.EntryPoint]]:
    """Entry points of the group by name (several packages may claim one name)."""
    out: dict[str, list[metadata.EntryPoint]] = {}
    for ep in metadata.entry_points(group=GROUP):
        same = out.setdefault(ep.name, [])
        if all(e.value != ep.value for e in same):
            same.append(ep)
    return out


def available() -> list[str]:
    """Names ``es.fitness`` can take on this machine, sorted: "logprob" and every installed plugin
    with a usable name claimed by one target. Reads package metadata only; imports no plugin."""
    names = {n for n, eps in _registered().items() if len(eps) == 1 and FITNESS_NAME.match(n)}
    return sorted(names | {BUILTIN})


def load(name: str) -> Callable:
    """The reward function ``fn(model, ids, mask) -> tensor [B]`` registered as ``name``.

    "logprob" is always the built-in (a plugin cannot shadow the paper's fitness)."""
    if name == BUILTIN:
        return sample_rewards
    if not isinstance(name, str) or not FITNESS_NAME.match(name):
        raise UserError(f"{name!r} is not a fitness plugin name: plugins are chosen by the name they are "
                        f"registered under in the '{GROUP}' entry-point group, never by a module path")
    eps = _registered().get(name, [])
    if not eps:
        raise UserError(f"fitness plugin '{name}' is not installed here (installed: {', '.join(available())}); "
                        f"install the package that registers it in the '{GROUP}' entry-point group")
    if len(eps) > 1:
        raise UserError(f"fitness plugin '{name}' is registered more than once "
                        f"({', '.join(e.value for e in eps)}); uninstall all but one")
    try:
        fn = eps[0].load()
    except Exception as err:  # the plugin's own import failed: say which, in one line
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"fitness plugin '{name}' ({eps[0].value}) failed to load: {type(err).__name__}: "
                        f"{first}") from None
    if not callable(fn):
        raise UserError(f"fitness plugin '{name}' ({eps[0].value}) is not a function")
    return fn
