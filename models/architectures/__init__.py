"""Network architectures. Every neural one maps a waveform batch ``(B, T)`` to logits
``(B, 2)`` with class 1 = bona fide, so training and scoring code never special-cases a
network; ``lfcc_gmm`` is the classic baseline and is scored through its own ``score``."""
