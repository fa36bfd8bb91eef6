"""`donkeytune ui`: a local web page for the whole job, from the data to the GGUF.

The page calls the same stage functions as the CLI (training, convert and test run as
`donkeytune` subprocesses, see jobs.py) and reads the files they write in the run's folder.
"""

from __future__ import annotations

import signal
import threading
import webbrowser

from ..config import UiOptions
from ..errors import ConfigError
from ..progress import say, warn

LOCAL = ("127.0.0.1", "localhost", "::1")


def run(opts: UiOptions) -> None:
    """Serve the page until Ctrl-C; a running job is stopped cleanly first."""
    try:
        import fastapi  # noqa: F401, PLC0415
        import uvicorn  # noqa: PLC0415
    except ImportError:
        raise ConfigError("the page needs FastAPI and uvicorn", "pip install 'donkeytune[ui]'") from None
    from ..use.serve import _check_port_free  # noqa: PLC0415
    from .app import build_app  # noqa: PLC0415

    _check_port_free(opts.host, opts.port)
    if opts.host not in LOCAL:
        warn(f"listening on {opts.host}: the page has no login, so anyone who can reach this "
             "address can upload data, train and read the run's files")
    app = build_app(opts.output_dir, ".", opts.model)
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    url = f"http://{'127.0.0.1' if opts.host in ('0.0.0.0', '::') else host}:{opts.port}/"
    say(f"DonkeyTune page for {opts.output_dir}/ at {url}  (Ctrl-C stops)")
    if opts.browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    # as in serve: uvicorn stops gracefully on SIGINT/SIGTERM and raises the signal again
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, host=opts.host, port=opts.port, log_level="warning",
                    timeout_graceful_shutdown=3)  # the event streams never end by themselves
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("Page stopped")
