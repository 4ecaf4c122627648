"""Build hook: generate proto/*_pb2.py from proto/*.proto with grpcio-tools.

The repository's proto/ is installed as `actserve.proto`, so protoc sees the files under that
virtual path (`-Iactserve/proto=proto`): stream.proto imports "actserve/proto/manifest.proto" and
the generated code imports `actserve.proto.manifest_pb2`. The modules are build outputs (git
ignores them), written next to the .proto files so that editable installs and the wheel agree.
"""
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


def generate_protos() -> None:
    from grpc_tools import protoc

    names = sorted(p.name for p in (ROOT / "proto").glob("*.proto"))
    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-Iactserve/proto={ROOT / 'proto'}", f"--python_out={out}", f"--pyi_out={out}",
                *(f"actserve/proto/{name}" for name in names)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {names}")
        for generated in (Path(out) / "actserve" / "proto").iterdir():
            shutil.copyfile(generated, ROOT / "proto" / generated.name)


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
