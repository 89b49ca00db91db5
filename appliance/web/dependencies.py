"""The services as handlers receive them, through Litestar's dependency injection.

A handler names the service it needs as a parameter typed with one of these
(`jobs: Jobs`); dependencies() provides every one of them by that name.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Annotated, Any

from litestar.di import Dependency, Provide

from appliance.accounts.service import AccountService, AuditService, KeyService, SignInService
from appliance.core.config import Config
from appliance.core.database import ConnectionPool
from appliance.engine.engine import Engine
from appliance.jobs.catalog import Catalog
from appliance.jobs.service import JobService
from appliance.services import Services

Accounts = Annotated[AccountService, Dependency()]
Audit = Annotated[AuditService, Dependency()]
Keys = Annotated[KeyService, Dependency()]
SignIn = Annotated[SignInService, Dependency()]
Jobs = Annotated[JobService, Dependency()]
EngineDependency = Annotated[Engine, Dependency()]
Models = Annotated[Catalog, Dependency()]
Database = Annotated[ConnectionPool, Dependency()]
Settings = Annotated[Config, Dependency()]
# Set when the server begins to shut down.
Stopping = Annotated[threading.Event, Dependency()]


def dependencies(services: Services) -> dict[str, Provide]:
    """Each of the container's services, provided under its field name."""
    def constant(value: Any) -> Provide:
        return Provide(lambda: value, use_cache=True, sync_to_thread=False)

    return {field.name: constant(getattr(services, field.name))
            for field in dataclasses.fields(services)}
