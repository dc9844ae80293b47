"""Network architectures. Every one maps a waveform batch ``(B, T)`` to logits ``(B, 2)``
with class 1 = bona fide, so training and scoring code never special-cases a model."""
