"""Apply six compatibility fixes to an unpacked ``pb1-detectron2==0.6`` sdist (detectron2 v0.6 on today's libraries).

``pb1-detectron2`` 0.6 has upstream detectron2 v0.6's Python files without the C++ sources. To run on
today's torch, Pillow, numpy and setuptools it needs:

1. setup.py: no C extension when ``detectron2/layers/csrc`` is absent, and the model-zoo configs
   (already inside ``detectron2/model_zoo/configs``) shipped as package data;
2. a missing ``detectron2._C`` tolerated: rotated-box ops and DeformConv raise only when called,
   ``COCOeval_opt`` falls back to pycocotools' ``COCOeval``;
3. ``Image.LINEAR`` → ``Image.BILINEAR`` (Pillow >= 10);
4. ``np.bool/int/float/object/str`` → builtins (numpy >= 1.24);
5. ``pkg_resources`` → ``os.path`` in ``model_zoo`` (setuptools >= 81);
6. ``engine.launch`` and ``create_ddp_model`` on machines without CUDA: the ``gloo`` backend and CPU
   DistributedDataParallel (no device ids), so ``--num-gpus N`` runs N CPU processes (tests, CPU clusters).

Usage: ``python scripts/patch_detectron2.py SRC_DIR``. Idempotent: a file already patched is left as
is. Every replacement is checked; a source that does not match the pinned sdist raises SystemExit.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

MARK = "# patched by sim-prelabels scripts/patch_detectron2.py"

NO_C = (
    "try:\n"
    "    from detectron2 import _C\n"
    "except ImportError:  # " + MARK[2:] + ": built without C++ ops\n"
    "    _C = None\n"
)


def _replace(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    if old not in text and (new in text or MARK in text):
        return  # already patched
    found = text.count(old)
    if found < count:
        raise SystemExit(f"patch_detectron2: {path}: expected {count}x {old!r}, found {found}")
    path.write_text(text.replace(old, new))


def patch(src: Path) -> None:
    """Patch the unpacked sdist at ``src`` in place (see module docstring)."""
    d2 = src / "detectron2"
    if not (d2 / "__init__.py").is_file():
        raise SystemExit(f"patch_detectron2: {src} is not an unpacked detectron2 sdist")

    # 1. setup.py: optional extension, model-zoo configs as package data.
    setup = src / "setup.py"
    _replace(setup, "def get_extensions():\n",
             "def get_extensions():  " + MARK + "\n"
             "    if not path.isdir(path.join(path.dirname(path.abspath(__file__)), 'detectron2', 'layers', 'csrc')):\n"
             "        return []\n")
    _replace(setup, "def get_model_zoo_configs() -> List[str]:\n",
             "def get_model_zoo_configs() -> List[str]:  " + MARK + "\n"
             "    zoo = path.join(path.dirname(path.realpath(__file__)), 'detectron2', 'model_zoo')\n"
             "    if not path.exists(path.join(path.dirname(path.realpath(__file__)), 'configs')):\n"
             "        return [path.relpath(p, zoo) for p in glob.glob(path.join(zoo, 'configs', '**', '*.*'), recursive=True)]\n")

    # 2. tolerate a missing detectron2._C
    for rel in ("layers/rotated_boxes.py", "layers/deform_conv.py", "layers/roi_align_rotated.py",
                "evaluation/fast_eval_api.py"):
        _replace(d2 / rel, "from detectron2 import _C\n", NO_C)
    fast = d2 / "evaluation" / "fast_eval_api.py"
    if "COCOeval_opt = COCOeval" not in fast.read_text():
        fast.write_text(fast.read_text() + "\n\nif _C is None:  " + MARK + "\n    COCOeval_opt = COCOeval  # noqa: F811\n")

    # 3. Pillow >= 10
    _replace(d2 / "data" / "transforms" / "transform.py", "Image.LINEAR", "Image.BILINEAR")

    # 4. numpy >= 1.24: deprecated aliases → builtins
    alias = re.compile(r"\bnp\.(bool|int|float|object|str)\b(?!_)")
    n = 0
    for py in list(d2.rglob("*.py")) + list((src / "projects").rglob("*.py")) + list((src / "tools").rglob("*.py")):
        text = py.read_text()
        new, k = alias.subn(r"\1", text)
        if k:
            py.write_text(new)
            n += k
    print(f"patch_detectron2: replaced {n} numpy aliases")

    # 5. setuptools >= 81 has no pkg_resources
    zoo = d2 / "model_zoo" / "model_zoo.py"
    _replace(zoo, "import pkg_resources\n", "")
    _replace(zoo, 'cfg_file = pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
             "cfg_file = os.path.join(os.path.dirname(__file__), \"configs\", config_path)  " + MARK)
    patch_cpu_launch(d2)
    print(f"patch_detectron2: patched {src}")


def patch_cpu_launch(d2: Path) -> None:
    """Fix 6 on the package folder ``d2`` (``.../detectron2``): launch and DDP without CUDA use gloo / CPU."""
    launch = d2 / "engine" / "launch.py"
    _replace(launch, '    assert torch.cuda.is_available(), "cuda is not available. Please check your installation."\n',
             "    cuda = torch.cuda.is_available()  " + MARK + ": without CUDA, gloo on the CPU\n")
    _replace(launch, '            backend="NCCL",\n', '            backend="NCCL" if cuda else "GLOO",\n')
    _replace(launch, "    assert num_gpus_per_machine <= torch.cuda.device_count()\n    torch.cuda.set_device(local_rank)\n",
             "    if cuda:\n        assert num_gpus_per_machine <= torch.cuda.device_count()\n"
             "        torch.cuda.set_device(local_rank)\n")
    defaults = d2 / "engine" / "defaults.py"
    _replace(defaults, '    if "device_ids" not in kwargs:\n        kwargs["device_ids"] = [comm.get_local_rank()]\n',
             '    if "device_ids" not in kwargs and torch.cuda.is_available():  ' + MARK + '\n'
             '        kwargs["device_ids"] = [comm.get_local_rank()]\n')


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cpu-launch":  # an installed package: fix 6 only
        patch_cpu_launch(Path(sys.argv[2]))
    elif len(sys.argv) == 2:
        patch(Path(sys.argv[1]))
    else:
        raise SystemExit("usage: python scripts/patch_detectron2.py SRC_DIR | --cpu-launch PACKAGE_DIR")
