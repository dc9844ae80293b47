"""Training problems: what a model learns from which data, with which loss."""
