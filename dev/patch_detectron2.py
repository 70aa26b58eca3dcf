"""Make Detectron2 v0.6's Python sources work on today's stack, in place.

Used by ``dev/install_detectron2.sh`` on the unpacked ``pb1-detectron2==0.6``
sdist (an unmodified copy of upstream v0.6 without ``layers/csrc``) and, with
``--upstream``, on a copy of upstream's source tree (``DETECTRON2_SOURCE``).
Each change is the smallest one that restores the old behaviour:

* ``PIL.Image.LINEAR`` was removed in Pillow 10; it was an alias of ``BILINEAR``.
* ``np.int`` / ``np.float`` / ``np.str`` / ``np.bool`` were removed in numpy 1.24;
  they were aliases of the Python builtins.
* ``pkg_resources`` is gone from setuptools >= 82; the model-zoo config lookup
  only needs the package directory.
* ``detectron2.export`` imports caffe2 at import time, which breaks
  ``detectron2.utils.analysis`` (FLOP counting); the caffe2 API becomes optional.
* Without ``csrc`` there is no ``detectron2._C``: its importers get ``_C = None``
  (only rotated boxes, deformable convs and the fast COCO evaluator use it), and
  ``setup.py`` builds no extension when the C++ sources are absent.
* ``setup.py``'s ``install_requires`` lose their version bounds, so that the
  pins of requirements.txt (installed first; Detectron2 itself goes in with
  ``--no-deps``) are the only ones and ``pip check`` stays clean; the caffe2 /
  LazyConfig-formatting extras we never use (future, pydot, hydra-core, black)
  are dropped.

Upstream's tree (``--upstream``) already has the Pillow, numpy and caffe2 fixes
and keeps its C++ ops: it gets the ``pkg_resources`` change (when it still
imports it) and the requirements change only.

Every pattern must be found exactly as expected, so a different Detectron2
source fails loudly here instead of being half patched.

    python dev/patch_detectron2.py [--upstream] SOURCE_DIR
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

MODEL_ZOO = "detectron2/model_zoo/model_zoo.py"
OPTIONAL_C = "try:\n    from detectron2 import _C\nexcept ImportError:  # built without csrc\n    _C = None\n"

# (file, regex, replacement, expected number of matches or None for "at least one")
LITERAL_PATCHES: list[tuple[str, str, str, int | None]] = [
    ("detectron2/data/transforms/transform.py", r"Image\.LINEAR\b", "Image.BILINEAR", 1),
    ("detectron2/model_zoo/model_zoo.py", r"^import pkg_resources\n", "", 1),
    (
        "detectron2/model_zoo/model_zoo.py",
        r'pkg_resources\.resource_filename\(\s*"detectron2\.model_zoo", '
        r'(os\.path\.join\("configs", config_path\))\s*\)',
        r"os.path.join(os.path.dirname(__file__), \1)",
        1,
    ),
    (
        "detectron2/export/__init__.py",
        r"^from \.api import \*\n",
        "try:\n    from .api import *  # needs caffe2\nexcept ImportError:\n    pass\n",
        1,
    ),
    (
        "setup.py",
        r"ext_modules=get_extensions\(\),",
        'ext_modules=get_extensions() if path.isdir("detectron2/layers/csrc") else [],',
        1,
    ),
]
# Requirements of Detectron2's setup.py for features our configs never use (caffe2 export, LazyConfig).
UNUSED_REQUIREMENTS = {"future", "pydot", "dataclasses", "hydra-core", "black"}
REQUIREMENTS_BLOCK = re.compile(r"install_requires=\[(.*?)\n\s*\],", re.DOTALL)
REQUIREMENT = re.compile(r'"([A-Za-z0-9_.\-]+)([^"]*)",[^\n]*')
NUMPY_ALIAS = re.compile(r"\bnp\.(int|float|str|bool)\b(?![\w.])")
C_IMPORT = re.compile(r"^from detectron2 import _C\n", re.MULTILINE)
C_IMPORTERS = [
    "detectron2/layers/deform_conv.py",
    "detectron2/layers/rotated_boxes.py",
    "detectron2/layers/roi_align_rotated.py",
    "detectron2/evaluation/fast_eval_api.py",
]


def align_requirements(setup_py: str) -> str:
    """``setup.py`` with every ``install_requires`` entry unpinned, the unused ones dropped."""
    block = REQUIREMENTS_BLOCK.search(setup_py)
    if block is None:
        raise SystemExit("setup.py: no install_requires=[...] block")

    def entry(match: re.Match) -> str:
        name = match.group(1)
        return "" if name.lower() in UNUSED_REQUIREMENTS else f'"{name}",'

    body, count = REQUIREMENT.subn(entry, block.group(1))
    if count < 5:
        raise SystemExit(f"setup.py: expected Detectron2's install_requires, found {count} entries")
    return setup_py[: block.start(1)] + body + setup_py[block.end(1) :]


def patch_tree(root: Path, upstream: bool = False) -> list[str]:
    """Apply all changes under ``root`` (``upstream``: the subset upstream's tree needs); return a log line
    per changed file. Nothing is written unless every check passes."""
    if not (root / "detectron2" / "__init__.py").is_file():
        raise SystemExit(f"{root} is not a Detectron2 source tree (no detectron2/__init__.py)")
    edits: dict[Path, str] = {}

    def text(rel: str) -> str:
        path = root / rel
        if path not in edits and not path.is_file():
            raise SystemExit(f"{rel} is missing from {root}: not Detectron2 v0.6's source tree?")
        return edits.get(path, path.read_text())

    log = []
    imports_pkg_resources = upstream and "import pkg_resources" in text(MODEL_ZOO)
    for rel, pattern, repl, expected in LITERAL_PATCHES:
        if upstream and not (rel == MODEL_ZOO and imports_pkg_resources):
            continue
        new, count = re.subn(pattern, repl, text(rel), flags=re.MULTILINE)
        if count == 0 or (expected is not None and count != expected):
            raise SystemExit(f"{rel}: expected {expected} match(es) of {pattern!r}, found {count}")
        edits[root / rel] = new
        log.append(f"{rel}: {pattern} x{count}")
    edits[root / "setup.py"] = align_requirements(text("setup.py"))
    log.append("setup.py: install_requires unpinned")
    if not upstream:
        for rel in C_IMPORTERS:
            new, count = C_IMPORT.subn(OPTIONAL_C, text(rel))
            if count != 1:
                raise SystemExit(f"{rel}: expected one 'from detectron2 import _C', found {count}")
            edits[root / rel] = new
            log.append(f"{rel}: optional _C")
        for path in sorted((root / "detectron2").rglob("*.py")):
            new, count = NUMPY_ALIAS.subn(r"\1", edits.get(path, path.read_text()))
            if count:
                edits[path] = new
                log.append(f"{path.relative_to(root)}: numpy aliases x{count}")
    for path, new in edits.items():
        path.write_text(new)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help="unpacked Detectron2 v0.6 source tree")
    parser.add_argument("--upstream", action="store_true", help="upstream's tree (DETECTRON2_SOURCE), not the sdist")
    args = parser.parse_args()
    for line in patch_tree(args.source, upstream=args.upstream):
        print(f"[patch_detectron2] {line}")


if __name__ == "__main__":
    main()
