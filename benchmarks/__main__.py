"""``python3 -m benchmarks`` lists the tools; ``python3 -m benchmarks NAME [ARGS]`` runs one with
ARGS as its command line (``NAME`` with dashes or underscores: ``gpu-checks`` = ``gpu_checks``)."""
from __future__ import annotations

import ast
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parent / "scripts"
_OWN = {"__init__", "__main__", "forward"}


def _is_wrapper(path: Path) -> bool:
    """A ``scripts/`` file that only runs its namesake here."""
    marker = "forward(globals()" if path.suffix == ".py" else "/../benchmarks/"
    return marker in path.read_text()


def tools() -> dict[str, Path]:
    """Name -> file: every tool here, and what ``scripts/`` still holds itself (not a wrapper)."""
    mine = sorted(HERE.glob("*.py")) + sorted(HERE.glob("*.sh"))
    found = {p.stem.replace("_", "-"): p for p in mine if p.stem not in _OWN}
    for p in sorted(SCRIPTS.glob("*.py")) + sorted(SCRIPTS.glob("*.sh")):
        name = p.stem.replace("_", "-")
        if name not in found and name != "install" and not _is_wrapper(p):
            found[name] = p
    return dict(sorted(found.items()))


def summary(path: Path) -> str:
    """The first line of the tool's docstring (or of its leading comment, for a shell script)."""
    text = path.read_text()
    if path.suffix == ".sh":
        comments = [line.lstrip("# ").strip() for line in text.splitlines()[1:] if line.startswith("#")]
        return comments[0] if comments else ""
    doc = ast.get_docstring(ast.parse(text)) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def listing() -> str:
    found = tools()
    width = max(len(n) for n in found)
    rows = [f"  {n:<{width}}  {textwrap.shorten(summary(p), 96 - width, placeholder=' ...')}"
            for n, p in found.items()]
    return ("python3 -m benchmarks NAME [ARGS]   (from the repository root; scripts/NAME.py runs the same)\n"
            + "\n".join(rows))


def run(name: str, args: list[str]) -> int:
    found = tools()
    path = found.get(name.replace("_", "-"))
    if path is None:
        print(f"benchmarks: no tool named {name!r}; the tools:\n{listing()}", file=sys.stderr)
        return 2
    if path.suffix == ".sh":
        return subprocess.run(["bash", str(path), *args]).returncode
    sys.argv = [str(path), *args]  # a tool's sys.exit ends the process, with its status
    sys.path.insert(0, str(path.parent))  # as for a script run by path: its siblings import by name
    if path.parent == HERE:
        runpy.run_module(f"benchmarks.{path.stem}", run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(str(path), run_name="__main__")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(listing())
        return 0
    return run(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
