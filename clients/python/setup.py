"""Generates the protobuf messages from proto/ when the package is built.

`pip install clients/python` (and `pip install -e clients/python`) runs
grpcio-tools' protoc on ../../proto/agentlifecycle/v1/lifecycle.proto (or on
the directory named by AGENT_LIFECYCLE_PROTO_DIR) and puts
`lifecycle_pb2.py` and its typed stub `lifecycle_pb2.pyi` into the
`agent_lifecycle` package. Nothing generated is committed.
"""

import os
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO_FILE = "agentlifecycle/v1/lifecycle.proto"


def proto_dir() -> Path:
    """The directory that holds agentlifecycle/v1/lifecycle.proto."""
    candidates = [os.environ.get("AGENT_LIFECYCLE_PROTO_DIR"), HERE.parent.parent / "proto", HERE / "proto"]
    for candidate in candidates:
        if candidate and (Path(candidate) / PROTO_FILE).is_file():
            return Path(candidate)
    raise SystemExit(
        f"cannot find {PROTO_FILE}: build from the agent-lifecycle checkout "
        "(clients/python beside proto/) or set AGENT_LIFECYCLE_PROTO_DIR"
    )


def generate(package_dir: Path) -> None:
    """Compiles the proto into package_dir/lifecycle_pb2.py and .pyi."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as out:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={proto_dir()}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed: {' '.join(args)}")
        package_dir.mkdir(parents=True, exist_ok=True)
        for name in ("lifecycle_pb2.py", "lifecycle_pb2.pyi"):
            shutil.copyfile(Path(out) / "agentlifecycle" / "v1" / name, package_dir / name)


class BuildPy(build_py):
    """build_py that generates the messages first (into the source tree for
    an editable install, into the build directory otherwise)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            generate(HERE / "src" / "agent_lifecycle")
        else:
            generate(Path(self.build_lib) / "agent_lifecycle")

    def get_outputs(self, include_bytecode: bool = True) -> list:
        outputs = list(super().get_outputs(include_bytecode))
        package = Path(self.build_lib) / "agent_lifecycle"
        outputs += [str(package / "lifecycle_pb2.py"), str(package / "lifecycle_pb2.pyi")]
        return outputs


setup(cmdclass={"build_py": BuildPy})
