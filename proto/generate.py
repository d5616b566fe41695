"""Regenerate the Python code for proto/*.proto (run after editing a .proto file; the output is committed).

    python -m pdserve.proto.generate            # or: python proto/generate.py

The generated modules import each other as `pdserve.proto.X_pb2`, so the .proto files are compiled from a staging
folder laid out as pdserve/proto/ (the repository root is the pdserve package and has no such folder).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def generate(out_dir: str = HERE) -> list[str]:
    """Compile every .proto here into `out_dir`; returns the generated file names. protoc runs in a child process:
    its compiled-in protobuf must not meet another one loaded here (NIXL bundles its own: a segfault)."""
    with tempfile.TemporaryDirectory() as staging:
        package_dir = os.path.join(staging, "pdserve", "proto")
        os.makedirs(package_dir)
        protos = sorted(glob.glob(os.path.join(HERE, "*.proto")))
        for path in protos:
            shutil.copy(path, package_dir)
        names = [os.path.join("pdserve", "proto", os.path.basename(p)) for p in protos]
        done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{staging}", f"--python_out={staging}",
                               f"--grpc_python_out={staging}", f"--pyi_out={staging}", *names], cwd=staging,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"protoc failed with exit code {done.returncode}: {done.stderr[-2000:]}")
        generated = sorted(f for f in os.listdir(package_dir) if f.endswith((".py", ".pyi")))
        for name in generated:
            shutil.copy(os.path.join(package_dir, name), os.path.join(out_dir, name))
    return generated


if __name__ == "__main__":
    print("\n".join(generate(sys.argv[1] if len(sys.argv) > 1 else HERE)))
