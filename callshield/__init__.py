"""Generated gRPC stubs of the callshield API (protos/callshield/; `make protos`)."""
