"""The house rules (tools/check_structure.py): no import cycle, lower layers import only lower
layers, the engine never reaches argparse, at most ten floors from errors to server, no
function over 80 lines or with more than 8 positional parameters."""

from tools import check_structure


def test_the_house_rules_hold(capsys):
    problems = check_structure.main()
    report = capsys.readouterr().out
    assert problems == 0, report
    assert "0 cycles" in report
