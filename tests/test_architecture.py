"""The shape of the code: no module over 600 lines, docs/internals.md's module map matches the tree,
every concern declared once (stage, launcher and kernel registries agree with what exists)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "cli", "gptbert", "tokenization", "flows")
MAX_LINES = 600


def _modules() -> list[str]:
    return sorted(p.relative_to(REPO).as_posix() for package in PACKAGES for p in (REPO / package).rglob("*.py")
                  if "/export/hf/" not in p.as_posix())


def _module_map() -> list[str]:
    """The paths in the first column of internals.md's module-map table."""
    text = (REPO / "docs" / "internals.md").read_text()
    section = text.split("## The module map", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", section, re.M)]


def test_no_module_is_over_600_lines():
    long = {m: n for m in _modules() + sorted(p.relative_to(REPO).as_posix() for p in (REPO / "benchmarks").glob("*.py"))
            if (n := len((REPO / m).read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_module_map_names_every_module_and_nothing_that_is_gone():
    paths = _module_map()
    assert len(paths) > 20, "the module map table was not found"
    for path in paths:
        assert (REPO / path).exists(), f"docs/internals.md names {path}, which is not in the tree"
    folders = [p for p in paths if p.endswith("/")]
    unnamed = [m for m in _modules() if m not in paths and not any(m.startswith(f) for f in folders)]
    assert unnamed == [], f"modules missing from docs/internals.md's module map: {unnamed}"
    assert len(paths) == len(set(paths)), "a path is named twice"


def test_the_docs_quote_no_line_counts():
    text = (REPO / "docs" / "internals.md").read_text()
    assert not re.search(r"\|\s*lines\s*\|", text) and not re.search(r"\b\d{2,4} lines\b", text)


def test_stage_registry_is_the_pipeline_order_and_each_stage_is_complete():
    from common.artifacts import STAGES
    from flows import stages

    assert tuple(stages.REGISTRY) == STAGES
    from common.config import PipelineConfig

    sections = set(PipelineConfig.__dataclass_fields__)
    for stage in stages.REGISTRY.values():
        assert callable(stage.run) and stage.sections and set(stage.sections) <= sections, stage


def test_every_launcher_has_a_preflight_check_and_every_kernel_a_test():
    from gptbert.distributed import LAUNCHERS, PREFLIGHT
    from gptbert.kernels import KERNELS

    assert set(PREFLIGHT) == set(LAUNCHERS)
    tests = "".join((REPO / "tests" / f).read_text() for f in ("test_kernels.py", "test_flex.py"))
    kernel_files = {p.stem for p in (REPO / "gptbert" / "kernels").glob("*.py")} - {"__init__"}
    assert kernel_files == set(KERNELS)
    for name in KERNELS:  # each kernel's module is imported by its equality tests
        assert f"gptbert.kernels.{name}" in tests, name
