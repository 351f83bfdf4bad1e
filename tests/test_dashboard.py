"""The dashboard: every page with Streamlit's AppTest against runs written by tiny real training
runs (DINO on a ViT, MAE) on the test S3 server; the token gate; names that would leave the root;
and `selfsup dashboard` itself in headless Chromium (Playwright driving Debian's chromium)."""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfsup import dashboard
from selfsup.dashboard import data
from selfsup.platform.config import load_config
from selfsup.platform.runs import RunError
from selfsup.platform.trainer import train

ROOT = "s3://test-dash/runs"
APP = str(Path(data.__file__).with_name("app.py"))
TOKEN = "test-token-123"
VIT = ["model.name=vit_tiny_patch16_224", "model.cifar_stem=false", "scaling.num_workers=1", "data.batch_size=8",
       "eval.train_samples=0", "eval.test_samples=0", "eval.k=5", "train.checkpoint_every_epochs=100",
       f"storage.root={ROOT}"]


@pytest.fixture(scope="module")
def runs(ray_local, tiny_labeled):
    uri, _ = tiny_labeled
    common = [f"data.uri={uri}", *VIT, "schedule.steps=3", "train.checkpoint_every_steps=3", "train.log_every_steps=1"]
    train(load_config("dino_vit_tiny", [*common, "storage.name=dino-vit", "data.views.global_view.size=16",
                                        "data.views.local_view.size=8", "data.views.n_local=2", "method.out_dim=64",
                                        "method.hidden_dim=32", "method.bottleneck_dim=16",
                                        "model.kwargs={img_size: 16, patch_size: 4, dynamic_img_size: true}"]),
          log=lambda *_: None)
    train(load_config("mae_vit_tiny", [*common, "storage.name=mae-vit", "data.views.view.size=16",
                                       "model.kwargs={img_size: 16, patch_size: 4}", "method.decoder_dim=32",
                                       "method.decoder_depth=1"]), log=lambda *_: None)
    return ["dino-vit", "mae-vit"]


def app(page: str | None = None, token: str | None = TOKEN, root: str = ROOT):
    from streamlit.testing.v1 import AppTest

    os.environ[dashboard.ROOT_ENV] = root
    os.environ[dashboard.TOKEN_ENV] = TOKEN
    at = AppTest.from_file(APP, default_timeout=120)
    if token is not None:
        at.query_params["token"] = token
    at.run()
    if page:
        at.switch_page(str(Path(APP).with_name("sections") / f"{page}.py")).run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def charts(at):
    return at.get("vega_lite_chart") + at.get("arrow_vega_lite_chart")


def images(at):
    return [im for el in at.get("image") for im in el.proto.imgs]


def test_without_the_token_no_page_runs(runs):
    for token in (None, "wrong"):
        at = app(token=token)
        assert at.error and "access token" in at.error[0].value
        assert not at.dataframe and not charts(at)


def test_runs_page_lists_the_runs_and_overlays_their_curves(runs):
    at = app("runs")
    table = at.dataframe[0].value
    assert set(runs) <= set(table["name"]) and set(table["status"]) == {"finished"}
    assert table.set_index("name").loc["dino-vit", "workers"] == 1
    assert len(charts(at)) >= 3  # loss, kNN, learning rate, images/s, workers, ...
    at.multiselect[2].set_value(runs).run()  # both runs overlaid
    drawn = [c.proto.SerializeToString() for c in charts(at)]  # the spec and its data
    assert all(b"dino-vit" in d and b"mae-vit" in d for d in drawn)
    assert "checkpoint-00000003" in at.dataframe[1].value["checkpoint"].tolist()
    at.text_input[0].set_value("mae").run()
    assert list(at.dataframe[0].value["name"]) == ["mae-vit"]
    # no credential on the page, the run's config and checkpoints included
    shown = " ".join(str(x.value) for kind in ("code", "caption", "markdown", "title", "error", "warning", "info")
                     for x in at.get(kind)) + " ".join(d.value.to_csv() for d in at.dataframe)
    assert "storage:" in shown  # the run's config.yaml is on the page
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in shown and os.environ["AWS_ACCESS_KEY_ID"] not in shown


def test_a_live_run_refreshes_itself(runs):
    import json

    from selfsup.pipelines.storage import open_store
    from selfsup.platform.runs import METRICS, SUMMARY, write_heartbeat

    src, live = open_store(f"{ROOT}/dino-vit"), open_store(f"{ROOT}/live-run", create=True)
    live.write(METRICS, src.read(METRICS))
    live.write(SUMMARY, json.dumps({**json.loads(src.read(SUMMARY)), "status": "running", "started": "9999"}).encode())
    write_heartbeat(live)  # a driver that beat just now
    import streamlit as st

    st.cache_data.clear()  # the pages' readers cache for 5 s, in this process, across AppTests
    try:
        at = app("runs")
        assert at.multiselect[2].value == ["live-run"]  # the newest run is selected
        assert any("live: refreshing every" in c.value for c in at.caption)
        at.multiselect[2].set_value(["dino-vit"]).run()
        assert not any("live: refreshing" in c.value for c in at.caption)
    finally:
        for key in live.list():
            live.delete(key)
        st.cache_data.clear()


def test_storage_that_cannot_be_read_is_one_line_on_the_page(runs):
    at = app("runs", root="s3://no-such-bucket-here/runs")
    assert at.error and "no-such-bucket-here" in at.error[0].value and "\n" not in at.error[0].value


def test_sweeps_page_has_an_empty_state(runs):
    at = app("sweeps")
    assert at.info and "No sweeps" in at.info[0].value


def test_attention_page_draws_every_head_and_its_mask(runs):
    at = app("attention")
    at.selectbox[0].select("dino-vit").run()
    heads = 3  # ViT-tiny
    pics = images(at)
    assert len(pics) == 3 + heads + heads  # input, mean, overlay; per head; thresholded per head
    assert any("patches" in (p.caption or "") for p in pics)
    at.radio[0].set_value("student").run()
    assert not at.exception and len(images(at)) == 3 + 2 * heads


def test_embeddings_page_maps_and_retrieves(runs):
    at = app("embeddings")
    assert charts(at)
    pics = images(at)
    assert pics[0].caption.startswith("query:") and len(pics) == 1 + 8
    assert any("neighbours share the query's class" in c.value for c in at.caption)
    at.radio[1].set_value("UMAP").run()
    assert not at.exception and charts(at)


def test_embeddings_page_opens_an_embed_output_under_the_root(runs, tiny_labeled):
    from selfsup.platform.embed import embed

    embed(f"{ROOT}/dino-vit", tiny_labeled[0], f"{ROOT}/dino-vit/embeddings")
    at = app("embeddings")
    at.radio[0].set_value("from a `selfsup embed` output").run()
    at.text_input[0].set_value("dino-vit/embeddings").run()
    assert not at.exception and not at.error and charts(at)
    table = at.dataframe[0].value
    assert list(table.columns) == ["key", "class", "similarity"] and len(table) == 8
    assert table["similarity"].is_monotonic_decreasing
    for bad in ("../dino-vit/embeddings", "/etc", "dino-vit/nothing-here"):
        at.text_input[0].set_value(bad).run()
        assert not at.exception and at.error, bad


def test_reconstructions_page_shows_original_masked_and_reconstruction(runs):
    at = app("reconstructions")
    assert at.selectbox[0].value == "mae-vit"
    pics = images(at)
    n = at.slider[0].value  # test images shown (as many as the tiny test split has, up to 6)
    assert n >= 2 and len(pics) == 3 * n and [p.caption for p in pics[1:3]] == ["masked input", "reconstruction"]


def test_views_page_shows_a_runs_augmentations(runs):
    at = app("views")
    at.radio[0].set_value("a run's").run()
    at.selectbox[0].select("dino-vit").run()
    assert not at.error and len(images(at)) == 6 * 4  # 2 global + 2 local crops per sample
    at.text_input[0].set_value("data.views.n_local=nope").run()
    assert at.error and dashboard.plain("n_local") in at.error[0].value


@pytest.mark.parametrize("name", ["../runs", "/etc", "s3://other-bucket/x", "a/../../b", "dino-vit/x", "..", "~"])
def test_a_name_that_leaves_the_root_is_refused(runs, name):
    with pytest.raises(RunError):
        data.run_uri(ROOT, name)


def drawn(page, last_words: str) -> None:
    """Wait until the page shows `last_words`, nothing on it is left over from the page before
    (Streamlit marks those stale) and its script is no longer running."""
    page.wait_for_function("""(words) => document.querySelector('[data-testid="stMain"]').innerText.includes(words)
        && !document.querySelector('[data-stale="true"]')
        && !document.querySelector('[data-testid="stStatusWidgetRunningIcon"], [data-testid="stStatusWidgetRunningManIcon"]')""",
                           arg=last_words, timeout=90_000)
    page.wait_for_timeout(500)  # pictures decode after the script ends


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed (make test installs it)")
def test_selfsup_dashboard_in_a_real_browser(runs, tmp_path):
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "SELFSUP_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "selfsup", "dashboard", "--root", ROOT, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    shots = Path(os.environ.get("SELFSUP_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"dashboard of {ROOT}: http://127.0.0.1:{port}/?token="), line + proc.stderr.read()
        url = line.split(": ", 1)[1].strip()
        log = Path(tmp_path / "home" / "dashboard" / f"streamlit-{port}.log")
        assert oct(log.stat().st_mode & 0o777) == "0o600" and oct(log.parent.stat().st_mode & 0o777) == "0o700"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            for path in ("", "attention", "runs?token=wrong"):  # no token, or a wrong one: only the way in
                answer = page.goto(url.split("?")[0] + path)
                assert answer.status == 403 and "access token" in page.inner_text("body"), path
            page.goto(url)
            drawn(page, "checkpoints of")
            page.wait_for_selector('[data-testid="stDataFrame"]', timeout=30_000)  # the runs table
            page.wait_for_selector('[data-testid="stVegaLiteChart"] .marks', timeout=30_000)  # a curve
            page.screenshot(path=str(shots / "runs.png"))
            # each page's last words: it has run to its end (charts and pictures above them)
            for name, last in [("attention", "head 0:"), ("embeddings", "neighbours share the query's class"),
                               ("reconstructions", "masked input"), ("views", "pictures per sample"),
                               ("sweeps", "No sweeps")]:
                page.click(f'[data-testid="stSidebarNav"] a[href$="/{name}"]')
                try:
                    drawn(page, last)
                except Exception:
                    page.screenshot(path=str(shots / f"{name}-not-drawn.png"))
                    raise
                assert not page.query_selector('[data-testid="stException"]'), name
                page.screenshot(path=str(shots / f"{name}.png"))
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)  # the CLI stops its Streamlit server on Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a failure, but nothing left running: the CLI nor its server
            __import__("ray")  # puts the psutil that Ray ships (ray/thirdparty_files) on the path
            import psutil

            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()  # by process id: only what this CLI started
            proc.kill()
            proc.wait()
            raise
    assert proc.returncode == 130
    with pytest.raises(ConnectionRefusedError):  # the Streamlit server went with it
        socket.create_connection(("127.0.0.1", port), timeout=5)


def _start(tmp_path, *extra, hangup=signal.SIG_DFL) -> tuple[subprocess.Popen, int, str, int]:
    """`selfsup dashboard` on a free port: (its process, port, token, its Streamlit's pid)."""
    import ray  # noqa: F401  (puts the psutil that Ray ships on the path)
    import psutil

    port = _free_port()
    # as from a terminal (SIG_DFL), or `nohup` (SIG_IGN): a suite run under nohup would pass that on
    proc = subprocess.Popen([sys.executable, "-m", "selfsup", "dashboard", "--root", str(tmp_path), "--port", str(port),
                             *extra], env={**os.environ, "SELFSUP_HOME": str(tmp_path / "home")},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, hangup))
    line = proc.stdout.readline()
    assert "?token=" in line, line + proc.stderr.read()
    (child,) = psutil.Process(proc.pid).children()
    return proc, port, line.rsplit("?token=", 1)[1].strip(), child.pid


def _status(port: int, path: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return conn.getresponse().status
    finally:
        conn.close()


def _gone(pid: int, timeout: float = 20) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_no_streamlit_endpoint_answers_without_the_token_and_every_signal_stops_it(tmp_path):
    import ray  # noqa: F401
    import psutil

    proc, port, token, streamlit = _start(tmp_path)
    cookie = {"Cookie": f"selfsup_token_{port}={token}"}
    ws = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    try:
        assert _status(port, "/_stcore/health") == 200  # the one endpoint open to all
        upload = {"Content-Type": "application/octet-stream"}
        for headers in ({}, {"Cookie": f"selfsup_token_{port}=wrong"}, {"Cookie": f"selfsup_token_1={token}"}):
            for path in ("/", "/runs", "/?token=wrong", "/_stcore/host-config", "/static/js/index.js", "/media/x.png",
                         "/component/x/index.html", "/_stcore/bidi-components/x", "/_stcore/metrics"):
                assert _status(port, path, headers=headers) == 403, (path, headers)
            assert _status(port, "/_stcore/stream", headers={**headers, **ws}) == 403, headers
            assert _status(port, "/_stcore/upload_file/s/f", "PUT", {**headers, **upload}, b"x" * 65536) == 403
        # the token in the address sets the cookie; the cookie alone then opens the rest
        assert _status(port, f"/?token={token}") == 200
        assert _status(port, "/_stcore/host-config", headers=cookie) == 200
        assert _status(port, "/_stcore/stream", headers={**cookie, **ws}) == 101
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143 and _gone(streamlit)
        proc, port, token, streamlit = _start(tmp_path)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(30) == 129 and _gone(streamlit)
        proc, port, token, streamlit = _start(tmp_path, hangup=signal.SIG_IGN)  # `nohup selfsup dashboard`
        proc.send_signal(signal.SIGHUP)
        time.sleep(2)
        assert proc.poll() is None and _status(port, "/_stcore/health") == 200  # it outlives the terminal
        proc.kill()  # no chance to clean up: the kernel tells Streamlit its parent died
        proc.wait()
        assert _gone(streamlit)
    finally:  # a failure, but nothing left running
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(streamlit).kill()


def test_an_uploaded_picture_becomes_the_runs_kind_of_image():
    import io

    import numpy as np
    from PIL import Image

    from selfsup.dashboard.pictures import decode_upload

    buf = io.BytesIO()
    Image.fromarray(np.full((5, 7, 3), (200, 10, 10), np.uint8)).save(buf, format="PNG")
    rgb, grey = decode_upload(buf.getvalue(), 3), decode_upload(buf.getvalue(), 1)
    assert rgb.shape == (3, 5, 7) and rgb[:, 0, 0].tolist() == [200, 10, 10]
    assert grey.shape == (1, 5, 7) and grey.dtype == rgb.dtype
    with pytest.raises(Exception):
        decode_upload(b"not a picture", 3)


def test_text_from_storage_is_shown_as_text_never_as_markdown(tmp_path):
    """A markdown image in a run's summary.json would make the viewer's browser fetch its URL."""
    import json

    evil = "![x](http://127.0.0.1:9/x.png) <img src=http://127.0.0.1:9/y.png>"
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "summary.json").write_text(json.dumps(
        {"status": "failed", "error": evil, "method": "simclr", "backbone": "resnet18", "started": "2026-12-01T00:00:00Z"}))
    at = app(root=str(tmp_path))
    shown = [e.value for e in at.error]
    assert shown == [dashboard.plain(f"evil: {evil}")] and shown[0].startswith("evil: \\!\\[x\\]\\(http")
