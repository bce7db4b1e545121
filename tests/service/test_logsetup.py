"""Log formats: journald priority prefixes by default, JSON lines when chosen."""

import io
import json
import logging

import pytest

from common.logsetup import setup_logging


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_journal_format_prefixes_every_line_with_its_priority(restore_root):
    out = io.StringIO()
    setup_logging("INFO", "journal", out)
    logging.getLogger("edge_agent.disk").error("disk: full")
    logging.getLogger("edge_agent.x").warning("careful")
    logging.getLogger("edge_agent.x").info("fine")
    logging.getLogger("edge_agent.x").debug("hidden")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("edge_agent.x").exception("failed")
    lines = out.getvalue().splitlines()
    assert lines[:3] == ["<3>edge_agent.disk: disk: full", "<4>edge_agent.x: careful", "<6>edge_agent.x: fine"]
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines[3:])
    assert any("ValueError: boom" in line for line in lines[3:])


def test_json_format_writes_one_object_per_line(restore_root):
    out = io.StringIO()
    setup_logging("DEBUG", "json", out)
    logging.getLogger("edge_agent.backup").warning("backup: %s", "line\nbreak")
    record = json.loads(out.getvalue())
    assert record["level"] == "warning" and record["logger"] == "edge_agent.backup"
    assert record["msg"] == "backup: line\nbreak" and record["ts"].endswith("Z")
