"""Generate the Python stubs for the ``.proto`` files under this directory.

The stubs (``*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``) are build products: never
edited by hand, never committed. They are written by

- the build: ``setup.py``'s ``build_py`` runs :func:`generate` for every build, a wheel
  or ``pip install -e .`` alike (setuptools runs ``build_py`` for editable installs too,
  and the stubs are written into the source tree, where both kinds of install find them);
- the import of :mod:`merlin_dp.protos.caraml.upi.v1`, which calls :func:`ensure` so that a checkout
  whose ``.proto`` files changed after its editable install regenerates them instead of
  serving stale code (needs ``grpcio-tools``, a dev dependency).

Import layout: the ``.proto`` files keep the standard UPI layout (``caraml/upi/v1/*.proto``
importing ``"caraml/upi/v1/table.proto"``), so they can be handed as they are to protoc for
any other language. protoc's Python output then says ``from caraml.upi.v1 import
table_pb2``; this project ships the stubs inside its ``protos`` package instead of a
top-level ``caraml`` package (which would collide with the published
``caraml-upi-protos`` distribution), so the generator rewrites those import lines to
``from merlin_dp.protos.caraml.upi.v1 import …``. Nothing else in the output is touched.

Whether the stubs are current is decided by a fingerprint of the ``.proto`` sources
(``SOURCES.sha256`` beside the stubs, written last), not by modification times, which a
checkout or an install does not keep.

Run it by hand with ``python -m merlin_dp.protos._generate``.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent  # the protoc include root: merlin_dp/protos/
PACKAGES = ("caraml/upi/v1",)
STAMP = "SOURCES.sha256"
_IMPORT = re.compile(r"^(\s*)(from|import) caraml\.upi\.", re.MULTILINE)


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.proto"))


def fingerprint() -> str:
    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def outputs(proto: Path) -> list[Path]:
    stem = proto.with_suffix("")
    return [
        stem.with_name(stem.name + "_pb2.py"),
        stem.with_name(stem.name + "_pb2.pyi"),
        stem.with_name(stem.name + "_pb2_grpc.py"),
    ]


def is_current() -> bool:
    for pkg in PACKAGES:
        stamp = ROOT / pkg / STAMP
        if not stamp.is_file() or stamp.read_text().strip() != fingerprint():
            return False
    return all(out.is_file() for proto in sources() for out in outputs(proto))


def generate() -> None:
    """Run protoc (from grpcio-tools) over every .proto; replace the stubs atomically."""
    try:
        from importlib.resources import files

        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ImportError(
            "generating the UPI stubs needs grpcio-tools (pip install grpcio-tools)"
        ) from exc
    well_known = str(files("grpc_tools") / "_proto")  # google/protobuf/timestamp.proto
    protos = [p.relative_to(ROOT).as_posix() for p in sources()]
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".gen-") as tmp:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={ROOT}",
                f"--proto_path={well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *protos,
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed (exit {code}) on {', '.join(protos)}")
        for proto in protos:
            for out in outputs(Path(tmp) / proto):
                text = _IMPORT.sub(r"\1\2 merlin_dp.protos.caraml.upi.", out.read_text())
                out.write_text(text)
                # os.replace: a process importing the stubs meanwhile sees old or new, whole.
                os.replace(out, ROOT / out.relative_to(tmp))
    stamp = fingerprint()
    for pkg in PACKAGES:
        part = ROOT / pkg / f".{STAMP}.{os.getpid()}"
        part.write_text(stamp + "\n")
        os.replace(part, ROOT / pkg / STAMP)


def ensure() -> None:
    """Generate the stubs when they are missing or older than the .proto files."""
    if is_current():
        return
    try:
        generate()
    except (ImportError, OSError):
        # No grpcio-tools, or a read-only installed copy: stale stubs beat none.
        if all(out.is_file() for proto in sources() for out in outputs(proto)):
            return
        raise


if __name__ == "__main__":
    generate()
    print(f"generated stubs for {len(sources())} .proto files under {ROOT}", file=sys.stderr)
