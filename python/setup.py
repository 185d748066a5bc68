"""Build hook: generates persistentkv/_proto (worker_pb2, worker_pb2_grpc) from the worker's proto.

The proto is read from ../proto/pkv/v1/worker.proto (this folder sits in the PersistentKV
repository), or from $PKV_PROTO_DIR/pkv/v1/worker.proto. It is compiled as
persistentkv/_proto/worker.proto so that the generated modules import each other inside the
package; the gRPC package and service names (pkv.v1.PersistentKV) stay those of the proto.
"""

import os
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def proto_file() -> str:
    root = os.environ.get("PKV_PROTO_DIR", os.path.join(HERE, os.pardir, "proto"))
    path = os.path.join(root, "pkv", "v1", "worker.proto")
    if not os.path.isfile(path):
        raise RuntimeError(f"persistentkv: {path} not found (set PKV_PROTO_DIR to the repository's proto/)")
    return path


def generate_stubs(out_dir: str) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)
    import grpc_tools

    with tempfile.TemporaryDirectory() as staging:
        package_dir = os.path.join(staging, "persistentkv", "_proto")
        os.makedirs(package_dir)
        shutil.copyfile(proto_file(), os.path.join(package_dir, "worker.proto"))
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        args = ["grpc_tools.protoc", f"-I{staging}", f"-I{well_known}", f"--python_out={out_dir}",
                f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
                os.path.join(package_dir, "worker.proto")]
        if protoc.main(args) != 0:
            raise RuntimeError("persistentkv: grpc_tools.protoc failed on worker.proto")
    with open(os.path.join(out_dir, "persistentkv", "_proto", "__init__.py"), "w") as f:
        f.write('"""Generated from proto/pkv/v1/worker.proto at build time."""\n')


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate_stubs(self.build_lib)


setup(cmdclass={"build_py": BuildPyWithStubs})
