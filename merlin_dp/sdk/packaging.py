"""Packaging a model object from a notebook into a directory a replica can start.

What Merlin's ``log_pyfunc_model`` does, for this data plane: the object (an instance or a
class with Merlin's ``initialize``/``infer`` or this project's ``load``/``predict``, or a
fitted scikit-learn estimator) is pickled with cloudpickle, so classes and functions
defined in the notebook travel by value; modules the notebook imported from files of
its own (not installed) travel by value too. Every distribution the pickle refers to is
recorded with its installed version in the manifest and ``requirements.txt``, and
artifacts are copied under ``artifacts/``. The format is
:mod:`merlin_dp.servers.package`'s, which loads it.

The directory is named by a digest of its contents, so packaging the same model twice
reuses one directory. What can't be pickled (an open file, a lock, a socket, a live
client) is refused with the attribute that holds it.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, packages_distributions
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import cloudpickle

from merlin_dp.sdk.errors import PackagingError
from merlin_dp.servers.merlin_contract import ARTIFACTS_DIR, follows_merlin
from merlin_dp.servers.package import (
    MANIFEST,
    PYFUNC_FILE,
    SKLEARN_FILE,
    Kind,
    Manifest,
    python_version,
)

PACKAGES_DIR = Path(".merlin-dp") / "packages"
# Needed to load what they pickle, but not the model's own requirements.
NOT_RECORDED = {"merlin-dataplane"}


@dataclass(frozen=True)
class Package:
    """A packaged model: deploy it with ``model_dir=path`` (type ``kind``)."""

    path: Path
    kind: Kind
    manifest: Manifest


def package(
    model: Any,
    directory: str | Path | None = None,
    *,
    artifacts: Mapping[str, str | Path] | None = None,
    requirements: Sequence[str] = (),
) -> Package:
    """Package ``model`` into ``directory`` (default ``.merlin-dp/packages/<digest>`` under
    the current directory). ``artifacts`` (name → file or directory) are copied in and
    given to ``initialize(artifacts)`` by name; ``requirements`` are added to those found."""
    kind, instantiate = _kind(model)
    pickled, modules = _pickle(model)
    found = _requirements(modules)
    pins = sorted({*found, *requirements, *(["cloudpickle==" + cloudpickle.__version__])})
    manifest = Manifest(
        kind=kind,
        model_file=SKLEARN_FILE if kind == "sklearn" else PYFUNC_FILE,
        model_class=_qualname(model if instantiate else type(model)),
        instantiate=instantiate,
        python=python_version(),
        requirements=tuple(pins),
        artifacts={
            name: f"{ARTIFACTS_DIR}/{name}/{Path(src).name}"
            for name, src in (artifacts or {}).items()
        },
    )
    sources = {name: Path(src).resolve() for name, src in (artifacts or {}).items()}
    for name, src in sources.items():
        if not name or "/" in name or name.startswith("."):
            raise PackagingError(f"artifact name {name!r}: use a plain name like 'model'")
        if not src.exists():
            raise PackagingError(f"artifact {name}: {src} does not exist")
    digest = _digest(pickled, manifest, sources)
    target = Path(directory) if directory is not None else PACKAGES_DIR / digest[:16]
    if (target / MANIFEST).exists() and (target / ".digest").read_text() == digest:
        return Package(target.resolve(), kind, manifest)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".packaging-", dir=target.parent))
    try:
        (scratch / manifest.model_file).write_bytes(pickled)
        for name, src in sources.items():
            dest = scratch / manifest.artifacts[name]
            dest.parent.mkdir(parents=True)
            if src.is_dir():
                shutil.copytree(src, dest)
            else:
                shutil.copy2(src, dest)
        (scratch / "requirements.txt").write_text("".join(f"{p}\n" for p in pins))
        (scratch / MANIFEST).write_text(manifest.to_json())
        (scratch / ".digest").write_text(digest)
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Package(target.resolve(), kind, manifest)


def _kind(model: Any) -> tuple[Kind, bool]:
    """("pyfunc" or "sklearn", whether a class was given)."""
    if _is_estimator(model):
        try:
            from sklearn.utils.validation import check_is_fitted

            check_is_fitted(model)
        except Exception as exc:  # NotFittedError, or not an estimator after all
            raise PackagingError(f"{_qualname(type(model))} is not fitted: {exc}") from None
        return "sklearn", False
    if isinstance(model, type):
        if not (follows_merlin(model) or callable(getattr(model, "predict", None))):
            raise PackagingError(_no_contract(model))
        required = [
            p.name for p in inspect.signature(model).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]  # fmt: skip
        if required:
            raise PackagingError(
                f"{model.__qualname__}() needs {', '.join(required)}: a class is constructed "
                "with no arguments where it runs; pass an instance instead"
            )
        return "pyfunc", True
    if isinstance(model, (types.FunctionType, types.ModuleType)):
        raise PackagingError(
            f"{model!r} is not a model: pass an object (or a class) with infer() (Merlin's "
            "PyFuncModel) or predict(), or a fitted scikit-learn estimator"
        )
    if not (follows_merlin(model) or callable(getattr(model, "predict", None))):
        raise PackagingError(_no_contract(type(model)))
    return "pyfunc", False


def _no_contract(cls: type) -> str:
    return (
        f"{cls.__qualname__} has neither infer() (Merlin's PyFuncModel: initialize(artifacts) "
        "and infer(request, **kwargs)) nor predict(payload)"
    )


def _is_estimator(model: Any) -> bool:
    if isinstance(model, type) or "sklearn" not in sys.modules:
        return False
    from sklearn.base import BaseEstimator

    return isinstance(model, BaseEstimator)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


class _Recorder(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, noting the module of every class, function and module it meets."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.modules: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.ModuleType):
            self.modules.add(obj.__name__)
        elif isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            self.modules.add(getattr(obj, "__module__", None) or "")
        else:
            self.modules.add(type(obj).__module__)
        return super().reducer_override(obj)


def _pickle(model: Any) -> tuple[bytes, set[str]]:
    """The pickle, and the top-level modules it refers to by reference. Modules that are
    neither installed nor the standard library (the notebook's own files) are pickled by
    value instead: where the model runs, they don't exist."""
    by_value: set[str] = set()
    try:
        for _ in range(10):
            buffer = io.BytesIO()
            recorder = _Recorder(buffer)
            recorder.dump(model)
            tops = {name.partition(".")[0] for name in recorder.modules if name}
            local = {t for t in tops - by_value if _is_local(t)}
            if not local:
                return buffer.getvalue(), tops - by_value
            for name in local:
                cloudpickle.register_pickle_by_value(sys.modules[name])
                by_value.add(name)
        raise PackagingError("the model's modules keep changing while it is pickled")
    except PackagingError:
        raise
    except Exception as exc:
        raise PackagingError(_unpicklable(model, exc)) from None
    finally:
        for name in by_value:
            cloudpickle.unregister_pickle_by_value(sys.modules[name])


def _is_local(top: str) -> bool:
    """A module of the notebook's own: imported from a file, not the standard library,
    not from an installed distribution."""
    if top in sys.stdlib_module_names or top in ("__main__", "builtins", ""):
        return False
    module = sys.modules.get(top)
    if module is None or not getattr(module, "__file__", None):
        return False
    return top not in packages_distributions()


def _unpicklable(model: Any, exc: Exception) -> str:
    """Which attribute can't be pickled, found by pickling each in turn."""
    where = ""
    for attr, value in vars(model).items() if hasattr(model, "__dict__") else []:
        try:
            cloudpickle.dumps(value)
        except Exception:
            where = f" (its attribute {attr!r}, a {type(value).__name__})"
            break
    return (
        f"cannot package {_qualname(type(model))}{where}: {type(exc).__name__}: {exc}. Open "
        "files, locks, sockets and clients can't travel: create them in initialize() (or "
        "load()), where the model runs"
    )


def _requirements(modules: set[str]) -> list[str]:
    """``name==version`` of the distribution behind each top-level module."""
    owners = packages_distributions()
    pins: set[str] = set()
    for top in modules:
        if top in sys.stdlib_module_names:
            continue
        for dist in owners.get(top, []):
            if dist in NOT_RECORDED:
                continue
            try:
                pins.add(f"{dist}=={installed_version(dist)}")
            except PackageNotFoundError:
                continue
    return sorted(pins)


def _digest(pickled: bytes, manifest: Manifest, artifacts: Mapping[str, Path]) -> str:
    h = hashlib.sha256(pickled)
    h.update(manifest.to_json().encode())
    for name in sorted(artifacts):
        src = artifacts[name]
        files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
        for path in files:
            h.update(f"{name}/{path.relative_to(src.parent)}".encode())
            h.update(path.read_bytes())
    return h.hexdigest()
