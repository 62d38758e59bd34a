"""tools/mutation.py stays usable: every mutant still finds its code exactly once and names
tests that exist (the mutation run itself is slow and not part of the suite)."""

from __future__ import annotations

import importlib.util
import sys

from support.processes import REPO


def load_tool():
    spec = importlib.util.spec_from_file_location("mutation", REPO / "tools" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutant_finds_its_code_once_and_names_existing_tests():
    tool = load_tool()
    assert len(tool.MUTANTS) >= 30
    assert len({m.name for m in tool.MUTANTS}) == len(tool.MUTANTS)
    for mutant in tool.MUTANTS:
        path, problem = tool.locate(mutant)
        assert path is not None, f"{mutant.name}: {problem} (update its snippet)"
        assert mutant.find != mutant.replace and mutant.tests, mutant.name
        for test in mutant.tests:
            file, _, name = test.partition("::")
            assert (REPO / file).is_file(), f"{mutant.name}: no {file}"
            assert not name or f"def {name}(" in (REPO / file).read_text(), (mutant.name, test)
