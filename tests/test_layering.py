"""The layers import only downwards (docs/internals.md): checked on the source, every import
statement included (also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATION = {"ray", "deepspeed", "prefect", "mlflow"}


def _imports(package: str) -> dict[str, set[str]]:
    """{module file: top-level names it imports} for every module of ``package``."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[path.relative_to(REPO).as_posix()] = names
    return out


def test_common_imports_no_layer_above_it():
    for module, names in _imports("common").items():
        assert not names & ({"torch", "gptbert", "tokenization", "flows", "cli"} | ORCHESTRATION), (module, names)


def test_tokenization_imports_no_torch_and_no_model():
    for module, names in _imports("tokenization").items():
        assert not names & ({"torch", "gptbert", "flows", "cli"} | ORCHESTRATION), (module, names)


def test_core_leaves_ray_and_deepspeed_to_the_distributed_package_and_knows_no_orchestration():
    for module, names in _imports("gptbert").items():
        assert not names & {"flows", "cli", "prefect", "mlflow"}, (module, names)
        if not module.startswith("gptbert/distributed/"):
            assert not names & {"ray", "deepspeed"}, (module, names)


def test_transformers_enters_only_the_export_and_the_exported_code_imports_no_gptbert():
    for package in ("common", "cli", "gptbert", "tokenization", "flows"):
        for module, names in _imports(package).items():
            if not module.startswith("gptbert/export/"):
                assert "transformers" not in names, (module, names)
    # The exported code runs where gptbert is not installed (the BabyLM pipeline's own environment).
    for module, names in _imports("gptbert/export/hf").items():
        assert names <= {"math", "torch", "transformers"}, (module, names)


def test_flows_and_cli_call_the_libraries_without_reaching_into_the_backends():
    for module, names in {**_imports("flows"), **_imports("cli")}.items():
        assert not names & {"ray", "deepspeed"}, (module, names)
        if module.startswith("cli/"):
            assert not names & {"prefect", "mlflow"}, (module, names)  # the pipeline command goes through flows


def test_no_module_imports_another_modules_private_names():
    for package in ("common", "cli", "gptbert", "tokenization", "flows"):
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom):
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, (path.relative_to(REPO).as_posix(), node.module, private)


PACKAGES = ("common", "cli", "gptbert", "tokenization", "flows")


def _module_graph() -> dict[str, set[str]]:
    """{module: project modules it imports}, every import statement counted (inside functions too);
    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``."""
    files = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "export/hf" in path.as_posix():
                continue  # copied into export folders, never imported by gptbert
            parts = path.relative_to(REPO).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    if target in files and target != name:
                        targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_builder_sees_a_cycle_and_relative_imports():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = _module_graph()
    assert "gptbert.model" in graph["gptbert.kernels.dropout"] or "gptbert.model" in graph["gptbert.kernels.flex"]
    assert "common.config.base" in graph["common.config.train"]


def test_no_import_cycles_among_the_project_modules():
    assert _cycles(_module_graph()) == []
