"""callshield.v1: generated from protos/callshield/v1/detection.proto; do not edit."""
