"""The README's option tables are generated from the config models and must not go stale."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_readme_component_options_match_the_models() -> None:
    r = subprocess.run([sys.executable, str(REPO / "tools" / "gen_config_docs.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_readme_shows_the_two_commands_first() -> None:
    text = (REPO / "README.md").read_text()
    first_block = text.split("```")[1]
    assert "make run" in first_block and "make test" in first_block
