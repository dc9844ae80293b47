"""callshield detection server: gRPC streaming API, per-stream pipeline, inference queue."""
