"""`spectra app` owns its server: SIGTERM or SIGINT to its PID stops Streamlit."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_spectra_app_stops_the_server(sig, tiny_llama_dir, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    with open(tmp_path / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spectra", "app", str(tiny_llama_dir), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the app did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        os.kill(proc.pid, sig)  # the PID the user started, nothing else
        assert proc.wait(timeout=30) is not None
        deadline = time.time() + 10
        while _port_open(port) and time.time() < deadline:
            time.sleep(0.2)
        assert not _port_open(port), "the Streamlit server still listens after the signal"
    finally:
        if proc.poll() is None:
            proc.kill()
