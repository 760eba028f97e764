"""The one lock between an ONNX export and a training step in the same process.

torch.export traces with process-wide state (`torch.fx.traceback`'s current node metadata, switched on
for the whole process while an export traces); autograd writes into that state during a backward pass
in any thread. A site that installs a deployment (export with its own BatchNorm layers) while it trains
a round, or an aggregator that exports while it distils, would crash one or the other
(``KeyError: 'custom'``). So an export holds `TRACING` from start to end, and every training step
(forward, backward, optimiser step) holds it for the step: a step waits at most for one export, an
export for one step.
"""

from __future__ import annotations

import threading

TRACING = threading.Lock()
