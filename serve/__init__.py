"""python -m serve: ONNX Runtime behind a dynamic batcher, over gRPC."""
