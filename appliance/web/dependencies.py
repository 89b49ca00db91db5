"""The services as handlers receive them, through Litestar's dependency injection.

A handler names the service it needs as a parameter typed with one of these
(`jobs: Jobs`); dependencies() provides every one of them by that name.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Annotated, Any

from litestar.di import Dependency, Provide
from litestar.params import SkipValidationMarker

from appliance.accounts.service import AccountService, AuditService, KeyService, SignInService
from appliance.core.config import Config
from appliance.core.database import ConnectionPool
from appliance.engine.engine import Engine
from appliance.jobs.catalog import Catalog
from appliance.jobs.service import JobService
from appliance.services import Services

# Provided, never parsed from a request: nothing to validate (and msgspec cannot
# describe some of their fields, such as the database's path-or-URL).
_SERVICE = Dependency()
_AS_GIVEN = SkipValidationMarker()

Accounts = Annotated[AccountService, _SERVICE, _AS_GIVEN]
Audit = Annotated[AuditService, _SERVICE, _AS_GIVEN]
Keys = Annotated[KeyService, _SERVICE, _AS_GIVEN]
SignIn = Annotated[SignInService, _SERVICE, _AS_GIVEN]
Jobs = Annotated[JobService, _SERVICE, _AS_GIVEN]
EngineDependency = Annotated[Engine, _SERVICE, _AS_GIVEN]
Models = Annotated[Catalog, _SERVICE, _AS_GIVEN]
Database = Annotated[ConnectionPool, _SERVICE, _AS_GIVEN]
Settings = Annotated[Config, _SERVICE, _AS_GIVEN]
# Set when the server begins to shut down.
Stopping = Annotated[threading.Event, _SERVICE, _AS_GIVEN]


def dependencies(services: Services) -> dict[str, Provide]:
    """Each of the container's services, provided under its field name."""
    def constant(value: Any) -> Provide:
        return Provide(lambda: value, use_cache=True, sync_to_thread=False)

    return {field.name: constant(getattr(services, field.name))
            for field in dataclasses.fields(services)}
