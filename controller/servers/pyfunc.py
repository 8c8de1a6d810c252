"""`python -m controller.servers.pyfunc module:Class`: serve a user's Python model class.

The class lives in the model directory (``CARAML_ARTIFACT_LOCATION``, put first on
``sys.path``); it is constructed with no arguments, gets ``load()`` once, then
``predict(payload)`` per request with the parsed JSON body, and returns anything JSON
can encode. Raising :class:`controller.servers.contract.BadInput` answers 400.
"""

from __future__ import annotations

import importlib
import os
import sys

from controller.servers.contract import Model, serve


def load_class(spec: str, model_dir: str) -> Model:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise SystemExit(f"pyfunc: {spec!r} is not module:Class")
    if model_dir:
        sys.path.insert(0, model_dir)
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"pyfunc: cannot find {spec} in {model_dir or sys.path}: {exc}") from None
    model = cls()
    for method in ("load", "predict"):
        if not callable(getattr(model, method, None)):
            raise SystemExit(f"pyfunc: {spec} has no {method}() method")
    return model  # type: ignore[no-any-return]


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m controller.servers.pyfunc module:Class")
    serve(load_class(sys.argv[1], os.environ.get("CARAML_ARTIFACT_LOCATION", "")))


if __name__ == "__main__":
    main()
