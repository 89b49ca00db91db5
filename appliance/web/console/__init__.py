"""The web console: sign-in, API keys, dashboard, playground, gallery and admin pages.

ConsolePlugin adds it to the app: its routes, server-side sessions in the
database, CSRF protection of every form, and the templates.
"""

from __future__ import annotations

from litestar import Router
from litestar.config.app import AppConfig
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import CacheControlHeader
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.plugins import InitPlugin
from litestar.static_files import create_static_files_router
from litestar.stores.registry import StoreRegistry
from litestar.types import Middleware

from appliance.core.config import Config
from appliance.ops.initialise import make_secret_file
from appliance.services import Services
from appliance.web.console.admin import AdminPages
from appliance.web.console.pages import ConsolePages
from appliance.web.console.rendering import (
    CONSOLE_EXCEPTION_HANDLERS,
    CONSOLE_PATH,
    STATIC,
    template_config,
)
from appliance.web.console.security import SecurityHeadersMiddleware, signed_in_guard
from appliance.web.console.sessions import STORE_NAME, ConsoleSessionConfig, DatabaseSessionStore
from appliance.web.console.signin_pages import home, login, login_page, logout
from appliance.web.console.system import SystemPages

CSRF_COOKIE = "console_csrf"


def read_secret(config: Config) -> str:
    make_secret_file(config.secret_file)
    secret = config.secret_file.read_text().strip()
    if len(secret) < 32:
        raise RuntimeError(f"{config.secret_file} holds no usable secret; delete it and run"
                           " `appliance init`")
    return secret


class ConsolePlugin(InitPlugin):
    def __init__(self, services: Services):
        self.services = services
        self.config = services.config

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        console = self.config.console
        sessions = ConsoleSessionConfig(max_age=console.idle_timeout_minutes * 60,
                                        secure=console.secure_cookies)
        session_store = DatabaseSessionStore(self.services.database)
        if isinstance(app_config.stores, StoreRegistry):
            app_config.stores.register(STORE_NAME, session_store)
        else:
            app_config.stores = {**(app_config.stores or {}), STORE_NAME: session_store}
        # On the console's routes only, not the app's: Bearer-key clients send no
        # cookies, so CSRF cannot touch them, the probes should hand out none, and
        # an API request is spared the middleware (a status poll is the request
        # clients send most).
        csrf = DefineMiddleware(CSRFMiddleware, config=CSRFConfig(
            secret=read_secret(self.config),
            cookie_name=CSRF_COOKIE,
            cookie_httponly=True,  # forms carry the token; no script needs the cookie
            cookie_samesite="lax",
            # Over HTTPS always, whatever this says: security.over_https.
            cookie_secure=console.secure_cookies,
        ))
        app_config.template_config = template_config()
        middleware: list[Middleware] = [SecurityHeadersMiddleware(), sessions.middleware, csrf]
        app_config.route_handlers.extend([
            Router(path="/", route_handlers=[home, login_page, login, logout],
                   middleware=middleware, exception_handlers=CONSOLE_EXCEPTION_HANDLERS,
                   include_in_schema=False),
            Router(path=CONSOLE_PATH, route_handlers=[ConsolePages, AdminPages, SystemPages],
                   guards=[signed_in_guard(self.services.accounts, console)],
                   middleware=middleware, exception_handlers=CONSOLE_EXCEPTION_HANDLERS,
                   include_in_schema=False),
            create_static_files_router(path="/console/static", directories=[STATIC],
                                       name="console.static", include_in_schema=False,
                                       cache_control=CacheControlHeader(max_age=3600),
                                       middleware=[SecurityHeadersMiddleware()]),
        ])
        return app_config
