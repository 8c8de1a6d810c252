"""Bearer tokens: who may read or write which projects, and who may run code on the host.

Tokens come from a YAML/JSON file (``--tokens FILE``) or the ``MERLIN_DP_TOKENS``
environment variable holding the same document::

    tokens:
      - {name: ops, token: "...", access: write, projects: ["*"], host: true}
      - {name: ci-fraud, token: "s3cret", access: write, projects: [fraud]}
      - {name: gateways, token: "r3ad", access: read, projects: ["*"]}

``write`` implies read. ``host: true`` (write tokens only) lets a token deploy what runs
code of its choosing on the controller's host: a ``custom`` command, a ``workdir``, a
``model_dir`` anywhere, any environment variable. That is the controller's own user's
power, whatever the token's projects say. Without it a token deploys only ``pyfunc`` and
``sklearn`` from a directory under one of the operator's ``--model-root`` directories,
with environment variables outside :data:`RESERVED_ENV_PREFIXES` and
:data:`RESERVED_ENV_NAMES` (:func:`host_refusals`). docs/security.md has the whole model.

With no tokens configured the API is open (everyone has every permission, host too),
and the controller binds to loopback only (and says so at start-up).
"""

from __future__ import annotations

import hmac
import importlib.machinery
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from merlin_dp.spec.endpoints import (
    VersionEndpointSpec,
)

Access = Literal["read", "write"]


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    access: Access
    projects: frozenset[str]
    host: bool = False  # may run code of its choosing on the controller's host

    def may(self, access: Access, project: str | None) -> bool:
        if access == "write" and self.access != "write":
            return False
        if project is None:  # every project (the route table)
            return "*" in self.projects
        return "*" in self.projects or project in self.projects


ANONYMOUS = Principal("anonymous", "write", frozenset({"*"}), host=True)


class _TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    token: str = Field(min_length=8)
    access: Access
    projects: list[str] = Field(min_length=1)
    host: bool = False

    @model_validator(mode="after")
    def _host_writes(self) -> _TokenEntry:
        if self.host and self.access != "write":
            raise ValueError(f"token {self.name}: host: true needs access: write")
        return self


class _TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[_TokenEntry]


class Tokens:
    def __init__(self, entries: list[_TokenEntry]) -> None:
        self._entries = [
            (e.token.encode(), Principal(e.name, e.access, frozenset(e.projects), e.host))
            for e in entries
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
        try:
            offered = authorization[7:].strip().encode()
        except UnicodeEncodeError:
            # aiohttp keeps bytes that aren't UTF-8 as surrogates: no token is made of them.
            return None
        for token, principal in self._entries:
            if hmac.compare_digest(token, offered):
                return principal
        return None


# --- what a token without host may deploy -----------------------------------------------

# Environment variables that make the dynamic loader, Python, a shell or a library load
# or run code, or that move where programs look for their configuration and files: set
# on a pyfunc or sklearn server, any of them turns "a model from an allowed directory"
# back into "any code". Compared upper-cased. Only tokens with host may set them.
RESERVED_ENV_PREFIXES = (
    "LD_", "DYLD_", "PYTHON", "GLIBC_", "GCONV_", "OPENSSL_", "SSL", "BASH_", "XDG_",
    "GIT_", "SSH_", "NODE_", "PERL", "RUBY", "JAVA_", "_JAVA_", "JDK_", "COVERAGE_",
    "MERLIN_DP_",
)  # fmt: skip
RESERVED_ENV_NAMES = frozenset({
    "PATH", "HOME", "ENV", "SHELL", "SHELLOPTS", "BASHOPTS", "IFS", "CDPATH", "TMPDIR",
    "TMP", "TEMP", "BROWSER", "EDITOR", "VISUAL", "PAGER", "LOCPATH", "NLSPATH",
    "HOSTALIASES", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
})  # fmt: skip
HOST_TYPES = ("pyfunc", "sklearn")  # the shipped servers: the only programs without host


def reserved_env(name: str) -> bool:
    upper = name.upper()
    return upper in RESERVED_ENV_NAMES or upper.startswith(RESERVED_ENV_PREFIXES)


def model_roots(paths: Sequence[Path]) -> tuple[str, ...]:
    """The operator's ``--model-root`` directories, resolved (symlinks and ``..``), so a
    model directory is compared with where the roots really are."""
    roots = []
    for path in paths:
        real = os.path.realpath(path)
        if not os.path.isdir(real):
            raise ValueError(f"--model-root {path} is not a directory")
        roots.append(real)
    return tuple(roots)


def host_refusals(spec: VersionEndpointSpec, roots: Sequence[str]) -> list[dict[str, str]]:
    """Why deploying ``spec`` needs the host permission, one entry per field ([] when it
    doesn't): anything but a shipped model server reading a directory under ``roots``."""
    refusals: list[dict[str, str]] = []

    def refuse(path: str, message: str) -> None:
        refusals.append({"path": path, "message": message})

    if spec.type not in HOST_TYPES:
        refuse("type", f"{spec.type} runs a command of the caller's choosing on this host")
    if spec.command:
        refuse("command", "runs on this host as the controller's user")
    if spec.workdir:
        refuse("workdir", "names a directory on this host")
    if spec.model_dir:
        where = _outside(spec.model_dir, roots)
        if where:
            refuse("model_dir", where)
        elif (spec.type == "pyfunc" and spec.pyfunc_class
              and not _module_in(spec.pyfunc_class, spec.model_dir)):  # fmt: skip
            module = spec.pyfunc_class.partition(":")[0].partition(".")[0]
            refuse("pyfunc_class", f"module {module} is not in model_dir")
    for name in sorted(spec.env_vars):
        if reserved_env(name):
            refuse(f"env_vars.{name}", "can make the server load or run other code")
    return refusals


def _outside(model_dir: str, roots: Sequence[str]) -> str:
    """Why ``model_dir`` is not under a root ("" when it is). Resolved first: ``..``
    and symlinks count where they lead, not how they are spelled."""
    if not roots:
        return "this controller allows no model directory without host (no --model-root)"
    if not os.path.isabs(model_dir):
        return "must be an absolute path under a --model-root"
    real = os.path.realpath(model_dir)
    if any(os.path.commonpath([real, root]) == root for root in roots):
        return ""
    return f"{real} is outside the model roots ({', '.join(roots)})"


def _module_in(pyfunc_class: str, model_dir: str) -> bool:
    """The class's top-level module is a file or package in ``model_dir`` (the pyfunc
    server loads it from there and nowhere else)."""
    top = pyfunc_class.partition(":")[0].partition(".")[0]
    try:
        names = set(os.listdir(model_dir))
    except OSError:
        return False
    suffixes = importlib.machinery.all_suffixes()
    # A regular package: a bare directory is only a namespace portion, which an import
    # by name would pass over for a module of that name elsewhere on sys.path.
    package = top in names and os.path.isfile(os.path.join(model_dir, top, "__init__.py"))
    return top.isidentifier() and (package or any(top + s in names for s in suffixes))
