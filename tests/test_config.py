"""The configuration: declared once (type, default, help, bounds), and the option table of
docs/pretraining.md says what the code does."""

import re
from dataclasses import fields
from pathlib import Path

import pytest

from sparkmim.config import ConfigError, PretrainConfig, load_config

OPTIONS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "pretraining.md"


def readme_table(heading: str) -> list[tuple[str, str, str]]:
    """``(flag, default, meaning)`` rows of the Markdown table under ``heading``."""
    text = OPTIONS_PAGE.read_text()
    start = text.index(heading)
    rows = []
    for line in text[start:].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        m = re.match(r"\| `(--[\w-]+)` \| (.*?) \| (.*) \|$", line)
        if m:
            rows.append(m.groups())
    return rows


def test_the_readme_option_table_matches_the_config():
    rows = readme_table("## Options of `sparkmim pretrain`")
    expected = [(f"--{f.name.replace('_', '-')}", str(f.default), f.metadata["help"]) for f in fields(PretrainConfig)]
    assert [r[0] for r in rows] == [e[0] for e in expected], "docs/pretraining.md lists other options, or in another order"
    for (flag, default, meaning), (_, want_default, want_meaning) in zip(rows, expected):
        assert default == want_default, f"{flag}: docs/pretraining.md default {default}, code {want_default}"
        assert meaning == want_meaning, f"{flag}: docs/pretraining.md says {meaning!r}, --help says {want_meaning!r}"


@pytest.mark.parametrize("values,message", [
    ({"loss_on": "visible"}, "loss_on must be one of masked, all, got 'visible'"),
    ({"in_chans": 0}, "in_chans must be >= 1, got 0"),
    ({"spacing": "1,1"}, r"spacing must be three positive voxel sizes .X,Y,Z. \(e.g. 1,1,1 or 0.8,0.8,3\), got .1,1."),
    ({"mask_ratio": 1.0}, r"mask_ratio must be in \(0, 1\), got 1.0"),
    ({"keep_last": 0}, "keep_last must be >= 1, got 0"),
    ({"epochs": "ten"}, "option epochs expects int, got 'ten'"),
])
def test_values_are_checked_against_their_declaration(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, values)


def test_choices_and_groups_reach_the_command_line(capsys):
    from sparkmim.cli import main

    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for group in ("data options", "model options", "optimisation options", "execution options", "outputs options"):
        assert group in text
    assert "{masked,all}" in text and "{fast,reference}" in text
