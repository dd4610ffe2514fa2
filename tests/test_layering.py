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
