"""The app served over real HTTP on a loopback port, from a thread of the test process.

For clients that need a real socket (the openai package, streamed server-sent
events, the command-line client); the TestClient serves everything else.
"""

from __future__ import annotations

import threading
import time

import uvicorn

from appliance.accounts import accounts, audit, keys
from appliance.bench.serving import free_port
from appliance.core.config import Config
from appliance.services import Services
from appliance.web.app import create_app


class LiveServer:
    def __init__(self, config: Config, load_generator=None):
        port = free_port()
        self.services = Services.build(config, load_generator=load_generator)
        self.app = create_app(self.services)
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port,
                                                    log_config=None, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while True:
            engine = self.services.engine
            if self.server.started and engine.ready:
                return self
            if engine.load_error or not self.thread.is_alive() \
                    or time.monotonic() > deadline:
                raise AssertionError("the live server did not start")
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def db(self):
        return self.services.database.db()

    def account_with_key(self, email: str = "dev@example.com", credits: int = 6):
        account = accounts.create_account(self.db, email, "correct horse battery",
                                          audit.Actor.cli(), credits=credits)
        return account, keys.create_key(self.db, account.id, "Test", audit.Actor.cli())[1]

    def balance(self, account) -> int:
        return accounts.get_account(self.db, account.id).credits


class GatedGenerator:
    """The real generator behind a gate the test opens: holds work back to observe the queue."""

    def __init__(self, real):
        self.real = real
        self.gate = threading.Event()
        self.started = threading.Event()

    def generate(self, prompts, seeds, settings):
        self.started.set()
        if not self.gate.wait(30):
            raise TimeoutError("the test never opened the gate")
        return self.real.generate(prompts, seeds, settings)


def real_generator(config: Config):
    from appliance.engine.diffusers_generator import load_configured_generator

    return load_configured_generator(config)
