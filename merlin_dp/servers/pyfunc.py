"""`python -m merlin_dp.servers.pyfunc [module:Class]`: serve a user's Python model.

The model directory (``CARAML_ARTIFACT_LOCATION``) holds the class's module, which is
loaded from there and nowhere else, and the class is constructed with no arguments. Two
contracts are served:

- this server's own: ``load()`` once, then ``predict(payload)`` per request with the
  parsed JSON body, returning anything JSON can encode (``predict`` may be ``async``);
- Merlin's PyFunc (:mod:`merlin_dp.servers.merlin_contract`): ``initialize(artifacts)``
  once, then ``infer(request, headers=...)``. A model file that imports ``merlin`` runs
  unchanged: where merlin-sdk is not installed, ``merlin.PyFuncModel`` is this
  project's.

With no class named, the directory is a package the SDK made
(:mod:`merlin_dp.servers.package`): the pickled object is loaded instead. Raising
:class:`merlin_dp.servers.contract.BadInput` answers 400.

The same ``predict`` answers KServe V2 / Open Inference Protocol calls
(``POST /v2/models/<name>/infer``), through :mod:`merlin_dp.servers.v2`: the request's
tensors arrive as a V1 payload, ``{"instances": rows}`` — one input's data reshaped to
its shape as nested lists, or with several inputs one ``{input name: value}`` record per
row — and the answer, ``{"predictions": [...]}`` or a bare list, goes back as tensors:
``output-0``, or one output per key when the predictions are dicts. A class written for
V1 ``instances`` serves V2 clients unchanged.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

from merlin_dp.servers.contract import Model, serve
from merlin_dp.servers.merlin_contract import (
    MerlinModel,
    artifacts_in,
    follows_merlin,
    provide_merlin,
    require_contract,
)
from merlin_dp.servers.package import PackageError, load_pyfunc


def load_class(spec: str, model_dir: str) -> Any:
    """An instance of ``module:Class`` from ``model_dir``, as constructed, unchecked."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise SystemExit(f"pyfunc: {spec!r} is not module:Class")
    provide_merlin()  # before the model's module runs its `import merlin`
    try:
        if model_dir:
            _load_top(module_name, model_dir)
            sys.path.insert(0, model_dir)  # the model's own imports of its siblings
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"pyfunc: cannot find {spec} in {model_dir or sys.path}: {exc}") from None
    return cls()


def load_model(spec: str, model_dir: str) -> Model:
    """What the server serves: the class named, or the package in ``model_dir``."""
    if not spec:
        try:
            return load_pyfunc(model_dir)  # type: ignore[no-any-return]
        except PackageError as exc:
            raise SystemExit(f"pyfunc: {exc}") from None
    model = load_class(spec, model_dir)
    if follows_merlin(model):
        return MerlinModel(model, artifacts_in(model_dir))
    require_contract(model, spec, "pyfunc", "load() and predict(payload)",
                     "initialize(artifacts) and infer(request, **kwargs)")  # fmt: skip
    return model  # type: ignore[no-any-return]


def _load_top(module_name: str, model_dir: str) -> None:
    """Load the class's top-level module from the model directory and nowhere else: that
    directory is what the deployer was allowed to name (a --model-root), not every
    module this interpreter could import. Loaded from the spec found there, not by name:
    a bare directory is only a namespace portion, and an import by name would let a
    module of that name elsewhere on sys.path (the standard library, the working
    directory) win."""
    top = module_name.partition(".")[0]
    found = importlib.machinery.PathFinder.find_spec(top, [model_dir])
    root = os.path.realpath(model_dir)
    origin = found.origin if found is not None else None
    if (found is None or found.loader is None or origin is None
            or os.path.commonpath([os.path.realpath(origin), root]) != root):  # fmt: skip
        raise SystemExit(f"pyfunc: no module {top} in the model directory {model_dir} "
                         "(a module file or a package with __init__.py); the class must "
                         "live there")  # fmt: skip
    if top in sys.modules:  # nothing was imported from model_dir yet: this one is not
        raise SystemExit(f"pyfunc: the module name {top} is taken by the server's own "
                         f"{sys.modules[top]!r}; rename the model's module")  # fmt: skip
    module = importlib.util.module_from_spec(found)
    sys.modules[top] = module  # before running it: its own submodule imports find it
    try:
        found.loader.exec_module(module)
    except BaseException:
        del sys.modules[top]
        raise


def main() -> None:
    if len(sys.argv) > 2:
        raise SystemExit("usage: python -m merlin_dp.servers.pyfunc [module:Class]")
    spec = sys.argv[1] if len(sys.argv) == 2 else ""
    serve(load_model(spec, os.environ.get("CARAML_ARTIFACT_LOCATION", "")))


if __name__ == "__main__":
    main()
