"""The README's commands are the ones CI runs, and its family list is the tested one."""

from pathlib import Path

from seer_adapter.model import TESTED_FAMILIES

ROOT = Path(__file__).resolve().parent.parent


def _commands():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:]
    return [b.split("```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    commands = _commands()
    assert any("seer-adapter demo" in c for c in commands)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_lists_the_tested_families():
    text = (ROOT / "README.md").read_text().replace("\n", " ")
    for family in TESTED_FAMILIES:
        assert f" {family}," in text or f" {family}." in text, family
