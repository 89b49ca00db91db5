"""The installed package's version, for the OpenAPI document and backup manifests."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

PACKAGE = "ai-media-maker"


def package_version() -> str:
    try:
        return version(PACKAGE)
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0.0.0"
