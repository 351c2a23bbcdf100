"""Plugins over HTTP: list with pool stats, one plugin, restart, reload."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from flux.api.gateway import Plugins

router = APIRouter(tags=["plugins"])

PluginName = Annotated[str, Path(min_length=1, max_length=64)]


@router.get("/plugins")
async def list_plugins(manager: Plugins) -> dict[str, Any]:
    """Every loaded plugin with its pool stats (available, max_size, hits, misses, recycles,
    traps), and the plugins that failed to load with the reason."""
    return {
        "plugins": manager.describe_all(),
        "errors": {name: error.to_dict() for name, error in manager.load_errors.items()},
    }


@router.get("/plugins/{name}", responses={404: {"description": "unknown plugin"}})
async def get_plugin(manager: Plugins, name: PluginName) -> dict[str, Any]:
    return manager.describe(name)


@router.post("/plugins/{name}/restart", responses={404: {"description": "unknown plugin"}})
async def restart_plugin(manager: Plugins, name: PluginName) -> dict[str, Any]:
    """Replace every instance of the plugin's pool with fresh ones."""
    return (await manager.restart(name)).as_dict()


@router.post("/plugins/reload")
async def reload_plugins(manager: Plugins) -> dict[str, Any]:
    """Re-read ``plugins/``: new pools are built and warmed first, then swapped in."""
    return (await manager.reload()).as_dict()


__all__ = ["router"]
