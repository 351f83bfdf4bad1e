"""`selfsup dashboard`: start the Streamlit app on 127.0.0.1 (unless --address says otherwise) with
a fresh access token, print the one address that opens it, and stop it on Ctrl-C, SIGTERM or
SIGHUP; Streamlit also ends when this process dies (the kernel's parent-death signal).

The token goes to Streamlit in its environment (readable by this user only, unlike a command line)
and to the browser in the printed URL; every request but the health check must carry it (gate.py).
Streamlit's own output goes to a private log under $SELFSUP_HOME/dashboard/, not to the console."""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from selfsup.dashboard import PORT_ENV, ROOT_ENV, TOKEN_ENV  # not data.py: Streamlit's caches warn outside the app
from selfsup.pipelines.seaweed import selfsup_home

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "asgi.py")
START_TIMEOUT_S = 60
# MB: the one upload there is, a picture for the Attention page
MAX_UPLOAD_MB = 8
PR_SET_PDEATHSIG = 1


class DashboardError(ValueError):
    """The dashboard cannot start as asked (a port taken, a root it cannot read): one line, exit 2."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP reached `selfsup dashboard`: the exit code it ends with."""

    def __init__(self, code: int):
        self.code = code


def _wildcard(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:  # a host name
        return False


def _check_port(address: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Streamlit's server: TIME_WAIT is free
        try:
            s.bind((address, port))
        except OSError as e:
            raise DashboardError(f"the dashboard cannot listen on {address}:{port} ({e.strerror or e}): "
                               "choose another --port") from None


def start(root: str, port: int, address: str = "127.0.0.1") -> tuple[subprocess.Popen, str, str]:
    """(the Streamlit process, the URL with its token, its log file), once it answers."""
    _check_port(address, port)
    token = secrets.token_urlsafe(24)
    logs = selfsup_home() / "dashboard"
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(logs, 0o700)
    log_path = logs / f"streamlit-{port}.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    env = {**os.environ, ROOT_ENV: root, TOKEN_ENV: token, PORT_ENV: str(port)}
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.address", address, "--server.port", str(port),
           "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--client.toolbarMode", "viewer", "--global.developmentMode", "false",
           "--server.maxUploadSize", str(MAX_UPLOAD_MB)]
    with os.fdopen(fd, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
    host = "127.0.0.1" if _wildcard(address) else address  # ask the health check on loopback then
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"the dashboard did not start on {address}:{port} ({tail[0]}); log: {log_path}")
            time.sleep(0.25)
    except BaseException:  # that error, Ctrl-C or a signal while it starts
        stop(proc)
        raise
    return proc, f"http://{host}:{port}/?token={token}", str(log_path)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, however it dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def serve(root: str, port: int, address: str = "127.0.0.1", log=print) -> int:
    from selfsup.pipelines.endpoints import StorageError, resolve_endpoint
    from selfsup.pipelines.storage import is_s3, open_store

    if is_s3(root):  # the endpoint now, as every command does (the embedded server starts if it is the one)
        resolve_endpoint()
    try:
        open_store(root)  # a location the pages can read (not http://, say), checked before Streamlit starts
    except StorageError as e:
        raise DashboardError(f"--root: {e}") from None

    def ends(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):  # one stop at a time: a second signal waits for it
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(128 + signum)

    # Before Streamlit starts: a signal that comes as soon as the address is printed stops it too.
    # A SIGHUP that `nohup` ignores stays ignored: that user wants the dashboard to outlive the terminal.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, ends)
    proc = None
    try:
        proc, url, log_path = start(root, port, address)  # stops Streamlit itself if interrupted
        log(f"dashboard of {root}: {url}")
        log(f"(the token in the address is the only way in; Streamlit's log: {log_path}; Ctrl-C stops it)")
        code = proc.wait()
    except (KeyboardInterrupt, Stopped) as e:
        if proc is not None:
            stop(proc)
        return e.code if isinstance(e, Stopped) else 130
    if code:
        raise RuntimeError(f"the dashboard stopped with exit code {code}; log: {log_path}")
    return 0
