"""The demo's document plan: seeds and depths."""

from __future__ import annotations

import argparse

import pytest

from emserve.server.cli import _seed_list, demo_depths


def test_seed_list_forms():
    assert _seed_list("3") == [3]
    assert _seed_list("0-4") == [0, 1, 2, 3, 4]
    assert _seed_list("1,4,7") == [1, 4, 7]
    for bad in ("a", "1-b", "", "5-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            _seed_list(bad)


def test_demo_depths_span_5_to_95_percent():
    assert demo_depths(1) == [0.5]
    assert demo_depths(3) == [0.05, 0.5, 0.95]
    d = demo_depths(10)
    assert d[0] == 0.05 and d[-1] == 0.95 and all(b > a for a, b in zip(d, d[1:], strict=False))


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    from emserve.server import version
    from emserve.server.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.strip() == f"emserve {version()}"
