"""The plugin manager: built-ins and entry points of group ``camframe``, loaded once."""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any

import pluggy

from camframe.plugins import hookspecs as _hookspecs
from camframe.core import validate as _validate
from camframe.adapters.base import Adapter
from camframe.core.errors import CamframeError
from camframe.methods.weightings import ALIASES

__all__ = ["ENTRY_POINT_GROUP", "pm", "adapters", "resolve_adapter", "methods", "resolve_method",
           "method_listing", "guided_rules", "load_model", "plugins_info"]

ENTRY_POINT_GROUP = "camframe"
_loaded = False
_distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version), from its entry point
pm = pluggy.PluginManager("camframe")
pm.add_hookspecs(_hookspecs)


def _manager() -> pluggy.PluginManager:
    global _loaded, _distributions
    if not _loaded:
        _distributions = _load_all()
        _loaded = True  # only once everything loaded: a failure midway leaves nothing half done
    return pm


def _load_all() -> dict[str, tuple[str, str]]:
    """Register the built-ins and every entry point; on any failure, unregister what this
    attempt registered and re-raise. Returns each loaded plugin's (distribution, version)."""
    from camframe.plugins import builtins as _builtins

    before = set(pm.get_plugins())
    found: dict[str, tuple[str, str]] = {}
    try:
        if pm.get_plugin("camframe.builtins") is None:
            pm.register(_builtins, name="camframe.builtins")
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if _load_entry_point(ep) and getattr(ep, "dist", None) is not None:
                found[ep.name] = (ep.dist.name, ep.dist.version)
    except BaseException:
        for plugin in set(pm.get_plugins()) - before:
            pm.unregister(plugin)
        raise
    return found


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> bool:
    """Register one entry point's plugin; a broken one warns. Whether it was registered now."""
    if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
        return False
    try:
        plugin = ep.load()
        pm.register(plugin, name=ep.name)
    except Exception as exc:  # a broken plugin must not take camframe down
        warnings.warn(f"camframe plugin {ep.name!r} failed to load: {type(exc).__name__}: {exc}", stacklevel=4)
        return False
    if not pm.get_hookcallers(plugin):
        pm.unregister(plugin)
        warnings.warn(f"camframe plugin {ep.name!r} implements no camframe hook", stacklevel=4)
        return False
    return True


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
                return _validate.adapter_fits(a, model)
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


def resolve_method(name: str) -> tuple[str, Any]:
    """The canonical name and the weighting method that ``name`` (or an alias, e.g. ``hirescam``) names."""
    found = methods()
    canonical = name if name in found else ALIASES.get(name, name)
    if canonical not in found:
        raise CamframeError(f"unknown method {name!r}; choose one of {', '.join(method_listing())}")
    return canonical, found[canonical]


def method_listing() -> list[str]:
    """Every method name, with its aliases: ``elementwise (alias: hirescam)``."""
    found = methods()
    listing = []
    for name in found:
        aliases = [a for a, target in ALIASES.items() if target == name and a not in found]
        listing.append(f"{name} (alias: {', '.join(aliases)})" if aliases else name)
    return listing


def guided_rules() -> list[Any]:
    """Activation functions and module types that the guided pass replaces."""
    return [r for group in _manager().hook.camframe_guided_rules() for r in group]


def load_model(spec: str, weights: str | None = None, device: str = "auto", unsafe_load: bool = False) -> Any:
    """Ask the plugins to load ``spec`` on ``device`` (``auto``: CUDA, else MPS, else CPU); a clear error
    when none knows it. ``unsafe_load``: the files are trusted, a pickled checkpoint may be unpickled in
    full (which runs any code it holds); by default it is read by torch's weights-only unpickler.

    Args:
        spec: a model name or file a plugin knows (``camframe plugins`` lists them).
        weights: a weights file to load into it.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        unsafe_load: unpickle trusted checkpoints in full.

    Returns:
        The model, on ``device``.
    """
    device = _validate.device(device)
    model = _manager().hook.camframe_load_model(spec=spec, weights=weights, device=device, unsafe_load=unsafe_load)
    if model is None:
        raise CamframeError(f"no plugin knows the model {spec!r}; `camframe plugins` lists what is installed")
    return model


def plugins_info() -> list[dict[str, Any]]:
    """Name, version and hooks of every registered plugin."""
    manager = _manager()
    from camframe import __version__

    info = []
    for name, plugin in manager.list_name_plugin():
        hooks = sorted(h.name for h in manager.get_hookcallers(plugin) or [])
        own = ("camframe", __version__) if name == "camframe.builtins" else ("-", "-")
        distribution, version = _distributions.get(name, own)
        info.append({"name": name, "distribution": distribution, "version": version, "hooks": hooks})
    return info
