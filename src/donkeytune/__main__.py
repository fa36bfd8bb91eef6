"""python -m donkeytune: the CLI (the page starts its jobs this way)."""

from .progress import honour_sigint

honour_sigint()  # before the imports of the CLI: a stop sent in the first second counts too

from .cli import main  # noqa: E402

raise SystemExit(main())
