import os

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

from models.cli import main  # noqa: E402

raise SystemExit(main())
