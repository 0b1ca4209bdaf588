"""`spectra app`: the Streamlit server in place of this process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from spectra.errors import SpectraInputError
from spectra.io import models


def cmd_app(args) -> int:
    """Replace this process by the Streamlit server (exec), so that a signal sent to
    `spectra app` reaches the server itself and stops it."""
    import importlib.util

    # the app runs from its files beside the package (a checkout; the wheel ships no
    # top-level `app`), else from an `app` package on the path; never imported here
    main_py = Path(__file__).resolve().parents[2] / "app" / "main.py"
    if not main_py.is_file():
        found = importlib.util.find_spec("app")
        if found is None or not found.submodule_search_locations:
            raise SpectraInputError("the app is not found: run spectra app from a checkout")
        main_py = Path(next(iter(found.submodule_search_locations))) / "main.py"
    if not 1 <= args.port <= 65535:
        raise SpectraInputError(f"--port {args.port}: must be 1..65535")
    models.resolve(args.model)  # a bad model fails here, with exit 2, not in the page
    env = dict(os.environ, SPECTRA_APP_MODEL=args.model)
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(main_py),
        "--server.port",
        str(args.port),
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
    ]
    if not os.environ.get("DISPLAY"):
        cmd += ["--server.headless", "true"]  # no browser to open on a server
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)
    return 1  # not reached
