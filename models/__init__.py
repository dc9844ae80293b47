"""callshield.models: countermeasure architectures, ASVspoof data, training and scoring.

Split the way pyannote.audio splits it: ``architectures`` (networks), ``data`` (corpus
readers and augmentation), ``tasks`` (training problems and their trainers), ``checkpoint``
(what a trained model's file records), ``inference`` (loading a trained detector and scoring
audio), ``metrics`` (official ASVspoof EER and min t-DCF). Imports run one way: ``tasks``
imports ``inference`` and ``checkpoint``, which import ``architectures``, which import
neither (tests/test_import_graph.py).

Score convention everywhere: class index 1 is bona fide, and a higher score means more
likely bona fide, as in the official ASVspoof scripts.
"""
