"""Speaker diarization for callshield: who speaks when in a MIXED call.

Importing this package is cheap; everything that needs pyannote.audio imports it lazily
(``import pyannote.audio`` costs ~11 s), so a server with diarization off never pays for it.
"""

MODEL_RATE = 16000  # what the segmentation and embedding models hear
