"""pyproject.toml states ranges that admit what GPU images ship, and constraints.txt (the set CI
installs) lies inside them, so the two files cannot drift apart."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# What CUDA images ship (e.g. torch 2.11.0+cu130 with transformers 5.17 and tokenizers 0.23.2).
GPU_IMAGE = {"torch": "2.11.0+cu130", "transformers": "5.17.0", "tokenizers": "0.23.2"}


def _requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found: dict[str, list[Requirement]] = {}
    for line in [*project["dependencies"], *[r for extra in project["optional-dependencies"].values() for r in extra]]:
        req = Requirement(line)
        found.setdefault(canonicalize_name(req.name), []).append(req)
    return found


def _pins() -> dict[str, Version]:
    pins = {}
    for number, raw in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # one exact pin per line
        assert spec.operator == "==" and not req.extras and req.marker is None, f"constraints.txt:{number}: {raw}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt:{number}: {name} pinned twice"
        pins[name] = Version(spec.version)
    return pins


def test_gpu_image_releases_satisfy_every_requirement_on_them():
    reqs = _requirements()
    for name, version in GPU_IMAGE.items():
        assert reqs.get(name), f"{name} is no longer a requirement: update GPU_IMAGE"
        for req in reqs[name]:
            assert req.specifier.contains(version, prereleases=True), f"{req} refuses {name} {version}"


def test_every_requirement_is_a_range_with_a_lower_bound():
    for name, reqs in _requirements().items():
        for req in reqs:
            ops = {s.operator for s in req.specifier}
            assert "==" not in ops and "===" not in ops, f"{req}: an exact pin (pins belong in constraints.txt)"
            assert ops & {">=", ">", "~="}, f"{req}: no lower bound"


def test_constraints_pin_every_direct_dependency_inside_its_range():
    reqs, pins = _requirements(), _pins()
    assert set(pins) == set(reqs), {"unpinned": sorted(set(reqs) - set(pins)),
                                    "not a dependency": sorted(set(pins) - set(reqs))}
    for name, version in pins.items():
        for req in reqs[name]:
            assert req.specifier.contains(version), f"constraints.txt pins {name}=={version} outside {req}"
