"""Speaker diarization for callshield: who speaks when in a MIXED call.

Importing this package is cheap; everything that needs pyannote.audio imports it lazily
(``import pyannote.audio`` costs ~11 s), so a server with diarization off never pays for it.

pyannote.audio 4 sends usage telemetry to an outside server unless told not to, and call
audio is private: every process that imports this package (server, workers, CLIs, tests)
turns it off here, before pyannote.audio can be imported, unless the operator set it.
"""

import os

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

MODEL_RATE = 16000  # what the segmentation and embedding models hear
