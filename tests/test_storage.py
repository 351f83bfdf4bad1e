import os
import socket
import stat
import subprocess
import sys

import pytest

from selfsup.pipelines.seaweed import EmbeddedS3
from selfsup.pipelines.storage import StorageError, open_store


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
        assert ep2.access_key == ep.access_key  # credentials generated once
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

    parser = build_parser()
    names = parser._subparsers._group_actions[0].choices
    for name in names:
        r = _cli(name, "--help")
        assert r.returncode == 0 and "usage: selfsup" in r.stdout, name
