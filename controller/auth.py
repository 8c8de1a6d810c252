"""Bearer tokens: who may read or write which projects.

Tokens come from a YAML/JSON file (``--tokens FILE``) or the ``MERLIN_DP_TOKENS``
environment variable holding the same document::

    tokens:
      - {name: ci-fraud, token: "s3cret", access: write, projects: [fraud]}
      - {name: gateways, token: "r3ad", access: read, projects: ["*"]}

``write`` implies read. With no tokens configured the API is open, and the controller
binds to loopback only (and says so at start-up).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Access = Literal["read", "write"]


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    access: Access
    projects: frozenset[str]

    def may(self, access: Access, project: str | None) -> bool:
        if access == "write" and self.access != "write":
            return False
        if project is None:  # every project (the route table)
            return "*" in self.projects
        return "*" in self.projects or project in self.projects


ANONYMOUS = Principal("anonymous", "write", frozenset({"*"}))


class _TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    token: str = Field(min_length=8)
    access: Access
    projects: list[str] = Field(min_length=1)


class _TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[_TokenEntry]


class Tokens:
    def __init__(self, entries: list[_TokenEntry]) -> None:
        self._entries = [
            (e.token.encode(), Principal(e.name, e.access, frozenset(e.projects))) for e in entries
        ]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @classmethod
    def parse(cls, text: str, source: str) -> Tokens:
        try:
            doc = _TokenFile.model_validate(yaml.safe_load(text))
        except (yaml.YAMLError, ValidationError) as exc:
            raise ValueError(f"tokens from {source} are invalid: {exc}") from None
        return cls(doc.tokens)

    @classmethod
    def load(cls, path: Path | None, env: str | None) -> Tokens:
        if path is not None:
            return cls.parse(path.read_text(), str(path))
        if env:
            return cls.parse(env, "MERLIN_DP_TOKENS")
        return cls([])

    def authenticate(self, authorization: str | None) -> Principal | None:
        if not self.enabled:
            return ANONYMOUS
        if not authorization or not authorization.startswith("Bearer "):
            return None
        offered = authorization[7:].strip().encode()
        for token, principal in self._entries:
            if hmac.compare_digest(token, offered):
                return principal
        return None
