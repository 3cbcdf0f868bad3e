"""`omni.serve.app:build_app`, the application builder of DESIGN.md's interface (`serve run omni.serve.app:build_app
model=tiny`). The builder lives with the deployments in omni.serve.cluster (the only package that imports ray); this
name stays importable without importing ray until it is called."""

from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def build_app(args: dict[str, Any]):
    """-> ray.serve.Application; see omni.serve.cluster.builder.build_app."""
    from omni.serve.cluster.builder import build_app as build

    return build(args)
