"""`spectra app`: the Streamlit server in place of this process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from spectra.errors import SpectraInputError
from spectra.io.model import open_model


def _free(port: int) -> bool:
    """Whether a server can listen on `port` on every interface, as Streamlit does
    (SO_REUSEADDR like Tornado, so a closing connection does not count as in use)."""
    import socket

    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this machine
            continue
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


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
    if not _free(args.port):  # Streamlit would log its own error and exit 1
        hint = next(
            (
                f" (try --port {p})"
                for p in range(args.port + 1, args.port + 50)
                if p <= 65535 and _free(p)
            ),
            "",
        )
        raise SpectraInputError(f"--port {args.port}: already in use{hint}")
    # a bad model, or one too big for this machine, fails here with exit 2, not in the page
    open_model(args.model, "auto", args.dtype, args.offload)
    env = dict(
        os.environ,
        SPECTRA_APP_MODEL=args.model,
        SPECTRA_APP_DTYPE=args.dtype,
        SPECTRA_APP_OFFLOAD=args.offload,
    )
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
