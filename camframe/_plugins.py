"""The plugin manager: built-ins and entry points of group ``camframe``, loaded once."""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any

import pluggy

from . import _hookspecs
from ._adapter import Adapter
from ._errors import CamframeError

__all__ = ["ENTRY_POINT_GROUP", "pm", "adapters", "resolve_adapter", "methods", "guided_rules",
           "load_model", "plugins_info"]

ENTRY_POINT_GROUP = "camframe"
_loaded = False
pm = pluggy.PluginManager("camframe")
pm.add_hookspecs(_hookspecs)


def _manager() -> pluggy.PluginManager:
    global _loaded
    if not _loaded:
        _loaded = True
        from . import _builtins

        pm.register(_builtins, name="camframe.builtins")
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _load_entry_point(ep)
    return pm


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> None:
    if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
        return
    try:
        plugin = ep.load()
        pm.register(plugin, name=ep.name)
    except Exception as exc:  # a broken plugin must not take camframe down
        warnings.warn(f"camframe plugin {ep.name!r} failed to load: {type(exc).__name__}: {exc}", stacklevel=3)
        return
    if not pm.get_hookcallers(plugin):
        pm.unregister(plugin)
        warnings.warn(f"camframe plugin {ep.name!r} implements no camframe hook", stacklevel=3)
        return
    dist = getattr(ep, "dist", None)
    if dist is not None:
        pm._plugin_distinfo.append((plugin, pluggy._manager.DistFacade(dist)))  # type: ignore[attr-defined]


def adapters() -> list[Adapter]:
    """Every registered adapter, best first (higher ``priority``; later plugins first on a tie)."""
    found = [a for group in _manager().hook.camframe_adapters() for a in group]
    return sorted(found, key=lambda a: -a.priority)


def resolve_adapter(model: Any, name: str | Adapter | None = None) -> Adapter:
    """The named adapter, else the first whose ``matches(model)`` is true."""
    if isinstance(name, Adapter):
        return name
    candidates = adapters()
    if name is not None:
        for a in candidates:
            if a.name == name:
                return a
        raise CamframeError(f"unknown adapter {name!r}; installed: {', '.join(a.name for a in candidates)}")
    for a in candidates:
        if a.matches(model):
            return a
    raise CamframeError(f"no adapter matches a model of type {type(model).__name__}; "
                        "install a plugin for it or pass adapter=...")


def methods() -> dict[str, Any]:
    """Weighting methods by name (built-ins, then plugins)."""
    merged: dict[str, Any] = {}
    for group in reversed(_manager().hook.camframe_methods()):
        merged.update(group)
    return merged


def guided_rules() -> list[Any]:
    """Activation functions and module types that the guided pass replaces."""
    return [r for group in _manager().hook.camframe_guided_rules() for r in group]


def load_model(spec: str, weights: str | None = None, device: str = "cpu") -> Any:
    """Ask the plugins to load ``spec``; a clear error when none knows it."""
    model = _manager().hook.camframe_load_model(spec=spec, weights=weights, device=device)
    if model is None:
        raise CamframeError(f"no plugin knows the model {spec!r}; `camframe plugins` lists what is installed")
    return model


def plugins_info() -> list[dict[str, Any]]:
    """Name, version and hooks of every registered plugin."""
    manager = _manager()
    versions = {id(p): d.version for p, d in manager.list_plugin_distinfo()}
    dists = {id(p): d.project_name for p, d in manager.list_plugin_distinfo()}
    from . import __version__

    info = []
    for name, plugin in manager.list_name_plugin():
        hooks = sorted(h.name for h in manager.get_hookcallers(plugin) or [])
        builtin = name == "camframe.builtins"
        info.append({"name": name, "distribution": dists.get(id(plugin), "camframe" if builtin else "-"),
                     "version": versions.get(id(plugin), __version__ if builtin else "-"), "hooks": hooks})
    return info
