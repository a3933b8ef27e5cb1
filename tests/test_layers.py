"""The package's layers: every import goes down the order of ../shared/DESIGN.md (or stays in
its layer), and the serving path stays light.

    core → data → models → checkpoints → index → retrieval → evaluation → training → tools
"""

import ast
import pathlib



PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ldot_jax"

# Lowest first. A module's layer is its subpackage's; top-level modules are listed.
LAYERS = ("core", "data", "models", "checkpoints", "index", "retrieval", "evaluation",
          "training", "tools")
SUBPACKAGE_LAYER = {name: name for name in LAYERS} | {"bench": "tools", "configs": "tools"}
# Top-level modules: the package's lazy export table (it names modules, imports none at
# import time) and the `python -m ldot_jax.<old name>` shims, which are command lines.
TOP_LEVEL_LAYER = {"__init__": "core", "__main__": "tools", "main": "tools", "convert": "tools",
                   "two_stage": "tools", "mine": "tools", "demo": "tools", "launch": "tools"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "ldot_jax", module
    if len(parts) == 1:
        return "core"
    if parts[1] in SUBPACKAGE_LAYER:
        # `python -m ldot_jax.index` is a command line, whatever package it sits in.
        return "tools" if parts[-1] == "__main__" else SUBPACKAGE_LAYER[parts[1]]
    if parts[1] in TOP_LEVEL_LAYER:
        return TOP_LEVEL_LAYER[parts[1]]
    raise AssertionError(f"{module}: not in a layer; add it to a subpackage of {LAYERS}")


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
    """(line, module) of every ldot_jax import in the file, function-level ones included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from ldot_jax.x import y` may import the module ldot_jax.x.y
            for a in node.names:
                candidate = f"{target}.{a.name}"
                as_module = PACKAGE.parent / (candidate.replace(".", "/") + ".py")
                as_package = PACKAGE.parent / candidate.replace(".", "/") / "__init__.py"
                if as_module.exists() or as_package.exists():
                    out.append((node.lineno, candidate))
                else:
                    out.append((node.lineno, target))
    return [(line, m) for line, m in out if m == "ldot_jax" or m.startswith("ldot_jax.")]


def all_modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    for path in all_modules():
        layer_of(module_name(path))


def test_imports_only_go_down_the_layers():
    order = {name: i for i, name in enumerate(LAYERS)}
    violations = []
    for path in all_modules():
        module = module_name(path)
        here = layer_of(module)
        for line, target in imported_modules(path, module):
            if target == "ldot_jax":
                continue
            there = layer_of(target)
            if order[there] > order[here]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} "
                                  f"({here}) imports {target} ({there})")
    assert not violations, "imports going up the layers:\n" + "\n".join(violations)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The checker itself: an index module importing the trainer is reported."""
    fake = PACKAGE / "index" / "_layer_probe.py"
    assert not fake.exists()
    try:
        fake.write_text("from ldot_jax.training import train\n")
        found = imported_modules(fake, module_name(fake))
        assert found == [(1, "ldot_jax.training.train")]
        assert layer_of(found[0][1]) == "training" and layer_of(module_name(fake)) == "index"
    finally:
        fake.unlink()


# The query path: what a service imports. Training, TFDS, grain and the LMDB reader stay out.
HEAVY = ("grain", "tensorflow_datasets", "optax", "lmdb", "tensorflow", "torch")

QUERY_SCRIPT = """
import json, sys
import ldot_jax.retrieval
light = sorted(m for m in {heavy!r} if m in sys.modules)
from ldot_jax.retrieval import Retriever
retriever = Retriever.from_dirs({model!r}, {index!r}, tokenizer={vocab!r})
hits = retriever.search_text(["a red circle", "two blue squares"], k=3)
print(json.dumps({{"after_import": light, "ids": hits.ids.tolist(),
                  "heavy": sorted(m for m in {heavy!r} if m in sys.modules),
                  "training": sorted(m for m in sys.modules if m.startswith(
                      ("ldot_jax.training", "ldot_jax.evaluation", "ldot_jax.tools")))}}))
"""


def test_the_query_path_imports_no_trainer_or_dataset_code(converted, tmp_path):
    """`import ldot_jax.retrieval` and a Retriever built from a model and an index directory
    (then a search) load neither the trainer nor TFDS, grain, optax or lmdb."""
    import json
    import subprocess
    import sys

    import numpy as np

    from ldot_jax.checkpoints import pretrained
    from ldot_jax.data.tokenizer import Tokenizer
    from ldot_jax.index import ExactIndex

    model_dir = converted["lightningdot"]
    loaded = pretrained.load_pretrained(model_dir)
    index = ExactIndex(loaded.config.project_dim)
    index.add(np.random.default_rng(0).normal(size=(20, index.dim)).astype(np.float32))
    index.info.update(model_fingerprint=pretrained.fingerprint(loaded.kind, loaded.config,
                                                               loaded.params), side="image")
    index.save(tmp_path / "index" / "image")
    Tokenizer.from_words(["a red circle", "two blue squares"], 100).save(tmp_path / "vocab")
    script = QUERY_SCRIPT.format(heavy=HEAVY, model=str(model_dir),
                                 index=str(tmp_path / "index"), vocab=str(tmp_path / "vocab"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["after_import"] == [] and out["heavy"] == [], out
    assert out["training"] == [], out
    ids = np.asarray(out["ids"])
    assert ids.shape == (2, 3) and set(ids.ravel()) <= set(range(20))
