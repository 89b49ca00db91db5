"""The HTTP benchmark's baseline: a bare Litestar route under uvicorn, answering a fixed JSON body.

What the framework and the server cost with nothing of the appliance's own:
no key check, no database, no middleware. Run as
`python -m appliance.bench.bare PORT BODY_FILE`; the body is a job as the
appliance answers it, so both sides send the same bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import uvicorn
from litestar import Litestar, get


def bare_app(body: dict[str, Any]) -> Litestar:
    @get("/job", sync_to_thread=False)
    def job() -> dict[str, Any]:
        return body

    return Litestar(route_handlers=[job])


def main() -> None:
    port, body_file = int(sys.argv[1]), Path(sys.argv[2])
    uvicorn.run(bare_app(json.loads(body_file.read_text())), host="127.0.0.1", port=port,
                log_level="warning")


if __name__ == "__main__":
    main()
