"""Run a module as `python -m` would, with some top-level packages made unimportable: a machine that lacks them.

    python without_packages.py ray,redis,... MODULE [ARGS...]
The GPU machines lent to an issue have torch, triton and transformers but not Ray, Redis, gguf, FastAPI or
llguidance; `test_gpu_check` runs the GPU check this way so an import of one of those on its path fails in CI
instead of on the device.
"""

import importlib.abc
import runpy
import sys


class MissingPackages(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (absent on the target machine)", name=fullname)
        return None


def main() -> None:
    names, module, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.meta_path.insert(0, MissingPackages(set(names.split(","))))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
