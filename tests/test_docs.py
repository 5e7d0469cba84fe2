"""The README documents what the code has: every engine option, with its flag and default."""
import dataclasses
from pathlib import Path

from tandem.config import option_fields

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_every_engine_option_is_in_the_readme_table():
    rows = {line.split("|")[1].strip(): line for line in README.splitlines() if line.startswith("| `")}
    for f in option_fields():
        row = rows.get(f"`{f.name}`")
        assert row is not None, f"option {f.name} missing from the README table"
        assert f"`--{f.name.replace('_', '-')}`" in row
        if f.default is not dataclasses.MISSING:
            assert f"`{f.default}`" in row, (f.name, f.default)
