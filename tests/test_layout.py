"""The package's layers, and no module importing another that (directly or not) imports it back.

    tandem.runtime (chooses the worker); llm, server, bench, cli      above both
    tandem.engine (host)            tandem.parallel -> tandem.worker (device) -> tandem.model, tandem.kernels
    tandem.contract: the step contract, the worker interface, the start-up steps      the ground floor
    tandem.config, sampling_params, outputs, tokenizer: plain data, torch-free
    tandem.switches: the environment switches, which every layer but the contract may read

The rules (every import counts, lazy ones inside functions too):
1. ``contract/`` imports, of tandem, only itself and ``sampling_params``; no torch or triton, since
   the host imports it.
2. ``engine/`` imports no torch or triton, nothing of ``worker/``, ``parallel/``, ``kernels/`` or
   ``runtime``, and of ``model/`` only the torch-free modules that describe a checkpoint
   (``model_config``, ``sources``, ``registry``); nothing it imports, directly or not, imports torch.
3. ``worker/`` imports, of tandem, only itself, ``contract/``, ``model/``, ``kernels/`` and ``config``:
   nothing of the engine (its start-up steps come through ``contract.startup``), nor ``parallel/``.
4. ``parallel/`` (a group of ranks as one worker) imports only itself, ``contract/``, ``worker/``,
   ``model/`` and ``config``: nothing of the engine either (rank 0 hands its followers the builder).
5. ``model/`` imports only itself, ``kernels/``, ``config`` and ``tokenizer``; ``kernels/`` only itself.
5a. ``spec/`` (speculative decoding's options, proposers, verification rules) imports only itself;
   the engine may import its torch-free ``config`` and ``proposer``.
6. Choosing the worker happens in one place: only ``tandem.runtime`` constructs ``DeviceWorker`` or
   ``TPWorker``.
7. No import cycles.
8. ``switches`` (the environment switches) imports nothing of tandem and no torch; every layer but
   the contract may read it."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "tandem"
TORCH = ("torch", "triton")

#: what each layer may import of tandem (a name covers its submodules)
ALLOWED = {
    "tandem.contract": ("tandem.contract", "tandem.sampling_params"),
    "tandem.engine": ("tandem.engine", "tandem.contract", "tandem.config", "tandem.sampling_params", "tandem.outputs",
                      "tandem.tokenizer", "tandem.model.model_config", "tandem.model.sources",
                      "tandem.model.registry", "tandem.spec.config", "tandem.spec.proposer", "tandem.switches"),
    "tandem.spec": ("tandem.spec",),
    "tandem.worker": ("tandem.worker", "tandem.contract", "tandem.model", "tandem.kernels", "tandem.config",
                      "tandem.switches"),
    "tandem.parallel": ("tandem.parallel", "tandem.contract", "tandem.worker", "tandem.model", "tandem.config",
                        "tandem.switches"),
    "tandem.model": ("tandem.model", "tandem.kernels", "tandem.config", "tandem.tokenizer", "tandem.switches"),
    "tandem.kernels": ("tandem.kernels", "tandem.switches"),
    "tandem.switches": ("tandem.switches",),
}
WORKER_CLASSES = {"DeviceWorker", "TPWorker"}
CHOOSER = "tandem.runtime"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any nesting level (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _files() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    files = _files()
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def _under(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def _imports_torch(path: Path) -> set[str]:
    return {m for m in _imports(path) if m.split(".")[0] in TORCH}


def test_each_layer_imports_only_what_is_below_it():
    graph = _graph()
    offenders = {}
    for module, deps in graph.items():
        layer = next((name for name in ALLOWED if _under(module, (name,))), None)
        bad = sorted(d for d in deps if layer is not None and not _under(d, ALLOWED[layer]))
        if bad:
            offenders[module] = bad
    assert not offenders


def test_the_contract_and_the_engine_never_reach_torch():
    """Not directly, and not through anything they import (the host side runs without a device)."""
    graph, files = _graph(), _files()
    reached, stack = set(), [m for m in graph if _under(m, ("tandem.contract", "tandem.engine"))]
    while stack:
        module = stack.pop()
        if module not in reached:
            reached.add(module)
            stack += graph[module]
    assert {"tandem.contract.step", "tandem.engine.core"} <= reached  # the walk walked
    offenders = {m: sorted(_imports_torch(files[m])) for m in sorted(reached) if _imports_torch(files[m])}
    assert not offenders


def test_one_place_chooses_the_worker():
    constructing = set()
    for module, path in _files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in WORKER_CLASSES:
                    constructing.add(module)
    assert constructing == {CHOOSER}


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
