"""`python -m gateway` and the `faktory-gateway` console script."""

from __future__ import annotations

import os
import sys

import uvloop

from . import logs
from .app import EXIT_CONFIG, Gateway
from .config import ConfigError, load, parse_invocation


def main(argv: list[str] | None = None) -> int:
    environ = dict(os.environ)
    try:
        invocation = parse_invocation(argv, environ)
        config = load(invocation, environ)
    except ConfigError as exc:
        print(f"faktory-gateway: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if invocation.check_only:
        print("faktory-gateway: configuration OK")
        return 0
    logs.configure(config.log.format, config.log.level)
    return uvloop.run(Gateway(config, invocation).run())


if __name__ == "__main__":
    sys.exit(main())
