"""The package's one-way layers (.importlinter, checked by `lint-imports` in CI) name every module: a new module
must be placed in a layer, or import-linter would not constrain it."""

import configparser
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
    pkg = os.path.join(ROOT, "qwen3_jax")
    for dirpath, _, files in os.walk(pkg):
        for f in files:
            if f.endswith(".py") and f != "__init__.py":
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3]
                yield rel.replace(os.sep, ".")


def test_every_module_is_in_a_layer():
    cp = configparser.ConfigParser()
    cp.read(os.path.join(ROOT, ".importlinter"))
    layers = [name.strip() for line in cp["importlinter:contract:layers"]["layers"].splitlines()
              for name in line.replace("|", ":").split(":") if name.strip()]
    assert len(layers) == len(set(layers)), "a module named in two layers"

    def placed(mod):
        return any(mod == layer or mod.startswith(layer + ".") for layer in layers)

    missing = sorted(m for m in _modules() if not placed(m))
    assert not missing, f"modules in no layer of .importlinter: {missing}"
