"""python -m serve: ONNX Runtime behind a dynamic batcher, over gRPC."""

import os

# onnxruntime (1.31) sends Microsoft telemetry over HTTPS by default and keeps a device id and a
# database under ~/.cache (its Privacy.md); with no writable home (a container) it printed a
# non-JSON warning line into the server's log. It reads this once, when first imported, which
# every path through this package (and export's parity checks) comes after. Set
# ORT_DISABLE_TELEMETRY=0 beforehand to keep it on.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
