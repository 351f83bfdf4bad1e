import os
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from selfsup.pipelines.seaweed import EmbeddedS3
from selfsup.pipelines.endpoints import StorageError
from selfsup.pipelines.storage import open_store


def test_embedded_server_lifecycle_keeps_data(tmp_path):
    server = EmbeddedS3(tmp_path)
    ep = server.up()
    try:
        assert ep.url.startswith("http://127.0.0.1:")
        for f in (server.creds_file, server.env_file):
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert "export AWS_ENDPOINT_URL=" + ep.url in server.env_text()
        assert server.up() == ep  # idempotent
        store = open_store("s3://keep/x", ep, create=True)
        store.write("a.txt", b"hello")
        # weed listens on loopback only: nothing answers on another local address
        port = int(ep.url.rsplit(":", 1)[1])
        other = socket.gethostbyname(socket.gethostname())
        if other != "127.0.0.1":
            with socket.socket() as s:
                s.settimeout(1)
                assert s.connect_ex((other, port)) != 0
    finally:
        assert server.down()
    assert not server.status()["running"]
    ep2 = server.up()
    try:
        assert ep2 == ep  # same keys and ports: an exported `storage env` stays valid
        assert open_store("s3://keep/x", ep2).read("a.txt") == b"hello"
    finally:
        server.down()
    assert not server.down()


def test_store_on_s3_and_local_alike(s3, s3_uri, tmp_path):
    for uri in (s3_uri, str(tmp_path / "local")):
        store = open_store(uri, create=True)
        store.write("d/one.bin", b"1" * 10, metadata={"sha256": "abc"})
        assert store.read("d/one.bin") == b"1" * 10
        assert store.exists("d/one.bin") and not store.exists("d/two.bin")
        assert store.list("d") == ["d/one.bin"]
        with pytest.raises(FileNotFoundError, match="two.bin"):
            store.read("d/two.bin")
        store.delete("d/one.bin")
        assert store.list() == []
    # a folder marker (pyarrow's create_dir writes them, as do S3 consoles) is no key: S3 lists as a
    # local folder does
    store = open_store(s3_uri)
    store.client.put_object(Bucket=store.bucket, Key="/".join(filter(None, [store.prefix, "d/"])), Body=b"")
    assert store.list() == [] and store.list("d") == []


def test_the_embedded_server_takes_more_buckets_than_free_disk_over_a_volume_size(s3):
    # Each bucket takes a volume; weed's own limit (free disk / 1 GiB) refused the 15th on a disk
    # with 15 GB free, failing whatever wrote to it later (a CI run lost 18 tests that way).
    disk = os.statvfs(tempfile.gettempdir())  # the test server's data dir is under it
    free_gib = disk.f_bavail * disk.f_frsize >> 30
    for i in range(min(free_gib + 2, 40)):
        store = open_store(f"s3://many-{i}/x", create=True)
        store.write("a", b"1")
        assert store.read("a") == b"1"


def test_missing_bucket_without_create_is_an_error(s3):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        open_store("s3://no-such-bucket/p", s3)


def _cli(*args, env=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "selfsup", *args], capture_output=True, text=True, env=e, timeout=120)


def test_unreachable_endpoint_is_one_line_exit_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    r = _cli("shard", "fashion-mnist", "s3://b/p", env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                                                         "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    assert r.returncode == 2
    assert r.stderr.strip() == f"selfsup: error: cannot reach S3 endpoint http://127.0.0.1:{port}: connection failed (opening bucket 'b')"


def test_bad_credentials_are_one_line_exit_2(s3):
    r = _cli("shard", "fashion-mnist", "s3://b/p", env={**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert f"S3 endpoint {s3.url} rejected the credentials" in r.stderr


def test_every_subcommand_has_help():
    from selfsup.platform.cli import build_parser

    from concurrent.futures import ThreadPoolExecutor

    parser = build_parser()
    names = list(parser._subparsers._group_actions[0].choices)
    with ThreadPoolExecutor(4) as pool:  # each is mostly interpreter start-up
        results = list(pool.map(lambda name: _cli(name, "--help"), names))
    for name, r in zip(names, results):
        assert r.returncode == 0 and "usage: selfsup" in r.stdout, name


def _http(url, method="GET", data=None, context=None):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=10, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError as e:  # TLS refused, connection reset
        return type(e).__name__, b""


def test_embedded_server_serves_data_only_through_s3_with_keys(tmp_path):
    """What another local user could try: every weed port but S3 refuses unsigned requests."""
    import ssl
    import time

    server = EmbeddedS3(tmp_path)
    ep = server.up()
    try:
        store = open_store("s3://private/p", ep, create=True)
        store.write("manifest.json", b"{}")
        ports = server._state()["ports"]
        filer, master = ports["filer.port"], ports["master.port"]
        obj = f"http://127.0.0.1:{filer}/buckets/private/p/manifest.json"
        assert _http(obj)[0] == 401
        assert _http(f"http://127.0.0.1:{filer}/buckets/private/p/")[0] == 401
        assert _http(f"http://127.0.0.1:{filer}/buckets/private/p/evil.txt", "PUT", b"x")[0] == 401
        assert _http(obj, "DELETE")[0] == 401
        # The master's HTTP API (which could drop a bucket's volumes) wants a client certificate.
        no_cert = ssl.create_default_context()
        no_cert.check_hostname, no_cert.verify_mode = False, ssl.CERT_NONE
        assert _http(f"http://127.0.0.1:{master}/col/delete?collection=private")[0] == 400
        assert _http(f"https://127.0.0.1:{master}/col/delete?collection=private", context=no_cert)[0] == "SSLError"
        # So does the volume server's: its /status would list the buckets, object counts and sizes.
        volume = ports["volume.port"]
        assert _http(f"http://127.0.0.1:{volume}/status")[0] == 400
        assert _http(f"https://127.0.0.1:{volume}/status", context=no_cert)[0] == "SSLError"
        # Every gRPC port: mutual TLS, so a client without the certificate gets no further than the handshake.
        for flag in ("master.port.grpc", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "admin.port.grpc"):
            with socket.create_connection(("127.0.0.1", ports[flag]), timeout=5) as raw:
                with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
                    with no_cert.wrap_socket(raw) as tls:
                        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                        tls.recv(1)
        assert store.read("manifest.json") == b"{}" and store.list() == ["manifest.json"]
        # Private to the user: every folder 0700 (so no file is reachable), our own files 0600.
        for dirpath, dirnames, filenames in os.walk(server.root):
            for d in dirnames:
                assert stat.S_IMODE(os.lstat(os.path.join(dirpath, d)).st_mode) == 0o700, os.path.join(dirpath, d)
        assert stat.S_IMODE(server.root.stat().st_mode) == 0o700
        for f in ("credentials.json", "env", "security.toml", "s3.json", "ports.json", "server.json", "tls/tls.key",
                  "logs/weed.log"):
            assert stat.S_IMODE((server.root / f).stat().st_mode) == 0o600, f
        # weed's own logs stay under the storage folder, not in /tmp.
        pid = server._state()["pid"]
        assert not list(Path("/tmp").glob(f"weed.*.{pid}"))
        assert list(server.logs.glob(f"weed.*.{pid}"))
        # The plugin worker finds the admin gRPC port it dials (HTTP port + 10000) instead of
        # retrying every 5 s forever.
        assert ports["admin.port.grpc"] == ports["admin.port"] + 10000 <= 65535
        time.sleep(6)
        log = server.log_file.read_text(errors="replace")
        assert "Reconnection attempt" not in log and "invalid port" not in log
    finally:
        server.down()


def test_down_and_status_never_take_another_process_for_the_server(tmp_path):
    """A stale server.json whose pid now belongs to another process: not running, not signalled."""
    import json

    server = EmbeddedS3(tmp_path)
    server.up()
    state = server._state()
    assert server._lock_holder() == state["pid"]  # weed itself holds server.lock
    assert server.down()
    assert server._lock_holder() is None
    other = subprocess.Popen(["sleep", "60"])
    try:
        server.state_file.write_text(json.dumps({**state, "pid": other.pid}))
        assert server.status()["running"] is False
        assert server.endpoint() is None
        assert server.down() is False
        assert other.poll() is None  # still alive
        # `up` starts a real server instead of trusting the stale file
        ep = server.up()
        assert server._state()["pid"] != other.pid and open_store("s3://fresh/x", ep, create=True).list() == []
        server.down()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_sockets_another_user_squats_and_a_rewritten_server_json_stop_nothing(tmp_path):
    """weed's gRPC sockets sit at fixed names in /tmp, from its ports: another user who creates them
    first would keep it from starting. `up` moves to ports whose names are free. And `down` stops
    the server that holds server.lock, whatever server.json says."""
    import json

    if os.geteuid() != 0:
        pytest.skip("a file owned by another user needs root to make (CI runs as root)")
    server = EmbeddedS3(tmp_path)
    server.up()
    ports = server._state()["ports"]
    assert server.down()
    squats = [Path(f"/tmp/seaweedfs-{svc}-grpc-{port}.sock") for svc in ("master", "filer") for port in ports.values()]
    try:
        for path in squats:
            path.write_bytes(b"")
            os.chown(path, 65534, 65534)  # nobody's (the test runs as root, as CI does)
        ep = server.up()
        assert open_store("s3://squat/x", ep, create=True).list() == []
        moved = server._state()["ports"]
        assert not set(moved.values()) & set(ports.values())
        pid = server._state()["pid"]
        server.state_file.write_text(json.dumps({"pid": 1, "ports": moved, "data": str(server.data)}))
        assert server.down() and server._lock_holder() is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        server.down()
        for path in squats:
            path.unlink(missing_ok=True)
