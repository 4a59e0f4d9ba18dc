"""The supervisor as state: the messages it reads."""
from __future__ import annotations

import pytest

from llmctl.common import admin


def test_a_link_report_keeps_its_wire_form():
    raw = b'{"kind":"worker_link","worker":"gpu1/w0.1","pid":7,"state":"joined",' \
          b'"detail":"","id":0}'
    report = admin.LinkReport(worker="gpu1/w0.1", pid=7, state="joined")
    assert admin.encode(report) == raw and admin.decode_link_report(raw) == report
    with pytest.raises(admin.AdminError, match="not a worker link report"):
        admin.decode_link_report(b'{"kind":"worker_link","worker":"w","pid":1,"state":"x"}')
