"""Merlin's PyFunc contract, served by the pyfunc server unchanged.

A class written for Merlin subclasses ``merlin.PyFuncModel`` and implements
``initialize(artifacts)`` (once, with a dict of artifact name → local path) and
``infer(request, **kwargs)`` (per request, with the parsed JSON body and
``headers=`` the request's headers), as merlin-sdk 0.50's ``merlin.pyfunc.PyFuncModel``
and merlin-pyfunc-server call them. This module owns that contract here:

- :class:`PyFuncModel`, the same base class for code written against this project;
- :func:`provide_merlin`: where merlin-sdk is not installed (it needs Python < 3.11 and
  pins what this project can't use), the pyfunc server makes ``import merlin``,
  ``merlin.model`` and ``merlin.pyfunc`` resolve to a stand-in offering
  :class:`PyFuncModel`, so a model file written for Merlin runs without an edit;
- :class:`MerlinModel`, which serves such an object through the server's
  ``load()``/``predict()``; :class:`MerlinUpiModel`, a UPI_V1 one (``upiv1_infer(request,
  context)``, with ``caraml.upi.v1``'s messages: where caraml-upi-protos is not installed,
  ``import caraml.upi.v1`` gives this project's wire-identical stubs);
- :func:`artifacts_in`: the artifacts a model directory offers ``initialize``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import sys
import types
from pathlib import Path
from typing import Any

log = logging.getLogger("model")

ARTIFACTS_DIR = "artifacts"
# The names a Merlin model file imports its base class by (merlin-sdk 0.50).
MERLIN_MODULES = ("merlin", "merlin.model", "merlin.pyfunc")


class PyFuncModel:
    """Merlin's PyFunc contract: subclass it and implement :meth:`initialize` and
    :meth:`infer`. Served by the pyfunc server, or deployed from a notebook with
    ``Client.deploy(name, model=MyModel())``."""

    def initialize(self, artifacts: dict[str, str]) -> None:
        """Called once before the first request: ``artifacts`` maps each artifact's name
        to its path on this machine. Load weights and open clients here."""

    def infer(self, request: Any, **kwargs: Any) -> Any:
        """Answer one request: ``request`` is the parsed JSON body, ``kwargs["headers"]``
        the request's headers. Return anything JSON can encode."""
        raise NotImplementedError(f"{type(self).__name__} does not implement infer()")


class MerlinUpiModel:
    """A Merlin PyFunc object answering UPI_V1: the UPI server hands ``predict_proto`` the
    request message and the call's context, and sends the response message it returns."""

    def __init__(self, model: Any, artifacts: dict[str, str]) -> None:
        self.model = model
        self.artifacts = artifacts

    def load(self) -> None:
        self.model.initialize(dict(self.artifacts))

    def predict_proto(self, request: Any, context: Any) -> Any:
        return self.model.upiv1_infer(request, context)


def answers_upi(obj: object) -> bool:
    """Written for Merlin's UPI_V1 contract (``initialize`` and ``upiv1_infer``)."""
    return callable(getattr(obj, "upiv1_infer", None)) and callable(
        getattr(obj, "initialize", None)
    )


def follows_merlin(obj: object) -> bool:
    """Written for Merlin's contract (``initialize`` and ``infer``) rather than this
    server's own (``load`` and ``predict``)."""
    return callable(getattr(obj, "infer", None)) and callable(getattr(obj, "initialize", None))


class MerlinModel:
    """A Merlin PyFunc object behind the server's ``load()``/``predict()``."""

    takes_headers = True  # contract.make_app passes the request's headers to predict

    def __init__(self, model: Any, artifacts: dict[str, str]) -> None:
        self.model = model
        self.artifacts = artifacts
        self._kwargs = _accepts_kwargs(model.infer)

    def load(self) -> None:
        self.model.initialize(dict(self.artifacts))

    def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        if self._kwargs:
            # Named as merlin-pyfunc-server's tornado hands them over (X-Tenant, whatever
            # case the caller sent, HTTP/2's lower case included): models index by it.
            named = {_header_case(k): v for k, v in (headers or {}).items()}
            return self.model.infer(payload, headers=named)
        # Merlin's older classes take no keyword arguments; merlin-pyfunc-server calls
        # them without headers too.
        return self.model.infer(payload)


def require_contract(model: object, spec: str, server: str, own: str, merlin: str) -> None:
    """Exit (the replica fails, saying why) unless ``model`` has ``load`` and
    ``predict``; ``own`` and ``merlin`` name the two contracts a server takes."""
    for method in ("load", "predict"):
        if not callable(getattr(model, method, None)):
            raise SystemExit(
                f"{server}: {spec} has no {method}() method (this server's contract is "
                f"{own}; Merlin's is {merlin})"
            )


def _header_case(name: str) -> str:
    return "-".join(word.capitalize() for word in name.split("-"))


def _accepts_kwargs(function: Any) -> bool:
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or p.name == "headers" for p in params)


def artifacts_in(model_dir: str, named: dict[str, str] | None = None) -> dict[str, str]:
    """Artifact name → absolute path. ``named`` (a package's manifest) gives names and
    paths relative to ``model_dir``; without it, every entry of ``model_dir/artifacts/``
    is offered under its file name and, where no two share one, its stem
    (``artifacts/model.joblib`` is ``"model.joblib"`` and ``"model"``)."""
    root = Path(model_dir).resolve()
    if named is not None:
        return {name: str(root / rel) for name, rel in named.items()}
    folder = root / ARTIFACTS_DIR
    if not folder.is_dir():
        return {}
    entries = sorted(folder.iterdir())
    found = {entry.name: str(entry) for entry in entries}
    stems: dict[str, list[Path]] = {}
    for entry in entries:
        stems.setdefault(entry.stem, []).append(entry)
    for stem, paths in stems.items():
        if len(paths) == 1 and stem not in found:
            found[stem] = str(paths[0])
    return found


def provide_merlin() -> bool:
    """Make ``import merlin`` (and ``merlin.model``, ``merlin.pyfunc``) give
    :class:`PyFuncModel` in this process, unless merlin-sdk itself is installed, and
    ``import caraml.upi.v1`` this project's UPI stubs, unless caraml-upi-protos is. True
    when the merlin stand-in was put in place."""
    if importlib.util.find_spec("caraml") is None:
        sys.meta_path.append(_UpiProtos())
    if "merlin" in sys.modules or importlib.util.find_spec("merlin") is not None:
        return False
    for name in MERLIN_MODULES:
        module = types.ModuleType(name, f"merlin-dataplane's stand-in for merlin-sdk's {name}")
        module.PyFuncModel = PyFuncModel  # type: ignore[attr-defined]
        module.__getattr__ = _missing(name)  # type: ignore[method-assign]
        if name == "merlin":
            module.__path__ = []  # a package: its submodules are the entries below
        sys.modules[name] = module
    sys.modules["merlin"].model = sys.modules["merlin.model"]  # type: ignore[attr-defined]
    sys.modules["merlin"].pyfunc = sys.modules["merlin.pyfunc"]  # type: ignore[attr-defined]
    log.info("merlin-sdk is not installed: `import merlin` gives the PyFuncModel stand-in")
    return True


def _missing(module: str) -> Any:
    def __getattr__(name: str) -> Any:
        raise AttributeError(
            f"{module}.{name}: merlin-sdk is not installed where this replica runs; "
            f"merlin-dataplane stands in for {module} with PyFuncModel only"
        )

    return __getattr__


class _UpiProtos(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``caraml`` and everything below it as aliases of ``merlin_dp.protos.caraml``: the
    same .proto files, so the same messages on the wire. Imported only when asked for."""

    PREFIX = "merlin_dp.protos."

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "caraml" and not fullname.startswith("caraml."):
            return None
        if importlib.util.find_spec(self.PREFIX + fullname) is None:
            return None
        is_package = hasattr(importlib.import_module(self.PREFIX + fullname), "__path__")
        return importlib.util.spec_from_loader(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(self.PREFIX + spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        """Already executed under its own name."""
