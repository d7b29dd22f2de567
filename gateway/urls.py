"""URLs as the gateway shows them: passwords never reach a log line or an error message."""

from __future__ import annotations

import re

_PASSWORD = re.compile(r"(//[^/@:]*:)[^@/]*@")


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and errors."""
    return _PASSWORD.sub(r"\1***@", url)
