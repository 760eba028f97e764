"""protocol/ is the wire contract: a third-party client must be able to use it without torch."""

from __future__ import annotations

import subprocess
import sys


def test_protocol_imports_without_torch():
    code = (
        "import sys\n"
        "import protocol.broker, protocol.chunks, protocol.codec\n"
        "import protocol.messages, protocol.mqtt, protocol.topics\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'reid'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
