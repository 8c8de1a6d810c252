"""A packaged model directory: what the SDK writes when it deploys an object, and how a
server loads it.

The directory holds the model (``python_model.pkl``, a cloudpickle of a pyfunc object or
class; or ``model.joblib``, a fitted scikit-learn estimator), its artifacts under
``artifacts/``, ``requirements.txt`` and the manifest ``merlin-dp-model.json``, which
says which of these it is, the Python it was packaged with and the distributions (with
versions) its pickle refers to. Like Merlin's ``log_pyfunc_model``, the directory is
whole: ``merlin-dp deploy --type pyfunc --model-dir DIR`` serves it with no class named.

Loading checks before unpickling: the same Python minor version (code pickled by value
does not cross versions), and every recorded distribution installed where the replica
runs (a missing one stops the replica with its name; another version is logged).
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("model")

MANIFEST = "merlin-dp-model.json"
PYFUNC_FILE = "python_model.pkl"
SKLEARN_FILE = "model.joblib"
FORMAT = 1

Kind = Literal["pyfunc", "sklearn"]


class PackageError(Exception):
    """The directory is not a package this server can load; the message says why."""


@dataclass(frozen=True)
class Manifest:
    kind: Kind
    model_file: str
    model_class: str  # module.QualName of what was packaged, for messages
    instantiate: bool  # a class was packaged: constructed with no arguments at load
    python: str  # "3.11"
    requirements: tuple[str, ...] = ()  # "scikit-learn==1.7.2"
    artifacts: dict[str, str] = field(default_factory=dict)  # name → path in the directory

    def to_json(self) -> str:
        data = {"format": FORMAT, **asdict(self), "requirements": list(self.requirements)}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, model_dir: str | Path) -> Manifest:
        path = Path(model_dir) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise PackageError(
                f"{model_dir} has no {MANIFEST}: name the class (module:Class), or deploy a "
                "directory the SDK packaged"
            ) from None
        except (OSError, ValueError) as exc:
            raise PackageError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PackageError(f"{path} is not a format {FORMAT} package manifest")
        try:
            manifest = cls(
                kind=data["kind"], model_file=data["model_file"],
                model_class=data["model_class"], instantiate=bool(data["instantiate"]),
                python=data["python"], requirements=tuple(data["requirements"]),
                artifacts=dict(data["artifacts"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"{path}: missing or malformed {exc}") from None
        if manifest.kind not in ("pyfunc", "sklearn"):
            raise PackageError(f"{path}: unknown kind {manifest.kind!r}")
        return manifest


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def requirement_gaps(requirements: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(missing, other versions): recorded ``name==version`` pins against what this
    interpreter has installed."""
    missing: list[str] = []
    differ: list[str] = []
    for pin in requirements:
        name, _, wanted = pin.partition("==")
        try:
            have = installed_version(name)
        except PackageNotFoundError:
            missing.append(pin)
            continue
        if wanted and have != wanted:
            differ.append(f"{name} {have} (packaged with {wanted})")
    return missing, differ


def load_pyfunc(model_dir: str) -> Any:
    """The packaged object, ready for the server's ``load()``/``predict()``."""
    from merlin_dp.servers.merlin_contract import MerlinModel, artifacts_in, follows_merlin

    manifest = Manifest.read(model_dir)
    if manifest.kind != "pyfunc":
        raise PackageError(f"{model_dir} holds a {manifest.kind} model: deploy it as that type")
    if manifest.python != python_version():
        raise PackageError(
            f"{manifest.model_class} was packaged with Python {manifest.python}; this replica "
            f"runs {python_version()}, and code pickled by value does not cross versions"
        )
    missing, differ = requirement_gaps(manifest.requirements)
    if missing:
        raise PackageError(
            f"{manifest.model_class} needs {', '.join(missing)}, not installed where the "
            f"replica runs ({sys.executable}); install them there (requirements.txt)"
        )
    if differ:
        log.warning("installed versions differ from the package's: %s", "; ".join(differ))
    path = Path(model_dir) / manifest.model_file
    try:
        with path.open("rb") as f:
            model = pickle.load(f)  # the deployer's own object, packaged by the SDK
    except Exception as exc:
        raise PackageError(f"cannot unpickle {path}: {type(exc).__name__}: {exc}") from None
    if manifest.instantiate:
        model = model()
    if follows_merlin(model):
        return MerlinModel(model, artifacts_in(model_dir, manifest.artifacts))
    if callable(getattr(model, "predict", None)):
        if not callable(getattr(model, "load", None)):
            return _NoLoad(model)
        return model
    raise PackageError(f"{manifest.model_class} has neither infer() nor predict()")


class _NoLoad:
    """An object with ``predict`` alone: nothing to load."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.predict = model.predict

    def load(self) -> None:
        pass
