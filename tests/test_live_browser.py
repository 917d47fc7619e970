"""The live view in a real browser: headless Chromium opens a deployment's page with an
admin's token, trusting the server by its key (the SPKI pin of its certificate), and
watches a job's round advance; the curves it is shown hold the rounds in metrics.jsonl."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from browser import chrome, full_screenshot, non_blank
from fedlift.deploy import DeployServer, load_kit, make_web_token, provision
from test_deploy_server import ADMIN, SITES, Party, Site, free_port, job_zip, make_job

ROOT = Path(__file__).resolve().parents[1]


def spki_pin(cert_path: Path) -> str:
    """Chromium's --ignore-certificate-errors-spki-list entry for a certificate: the
    base64 SHA-256 of its SubjectPublicKeyInfo (this key is trusted, no other)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[Path, DeployServer]]:
    kits = tmp_path / "kits"
    provision("demo", f"localhost:{free_port()}", SITES, [ADMIN], kits)
    with DeployServer(
        kits / "server", tmp_path / "ws", address="127.0.0.1:0", web="127.0.0.1:0"
    ) as server:
        yield kits, server


def round_shown(driver: Any, job_id: str) -> str:
    found = driver.execute_script(
        "const n = document.querySelector('.current-round[data-job=\"' + arguments[0] + "
        "'\"]'); return n ? n.textContent : '';",
        job_id,
    )
    return str(found)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def curve_vertices(driver: Any, job_id: str) -> dict[str, int]:
    """The curves SVG the page shows, fetched as the page does: per series id, the number
    of vertices of its line."""
    script = """
    const done = arguments[arguments.length - 1];
    fetch('/api/curves/' + arguments[0] + '.svg', {credentials: 'same-origin'})
      .then(r => r.text()).then(text => {
        const svg = new DOMParser().parseFromString(text, 'image/svg+xml');
        const out = {};
        svg.querySelectorAll('g[id^="series-"]').forEach(g => {
          const path = g.querySelector('path');
          if (path) out[g.id] = (path.getAttribute('d').match(/[ML]/g) || []).length;
        });
        done(out);
      }).catch(err => done({error: String(err)}));
    """
    found = driver.execute_async_script(script, job_id)
    assert "error" not in found, found
    return {str(k): int(v) for k, v in found.items()}


def test_the_live_page_follows_a_running_job(deployment: tuple[Path, DeployServer]) -> None:
    kits, server = deployment
    admin = Party(kits, ADMIN, server.address)
    first = Site(kits, "site-1", server.address, hold_round=1)
    second = Site(kits, "site-2", server.address, hold_round=2)
    try:
        job_dir = make_job(kits.parent / "job", num_rounds=4)
        job_id = admin.call("job_submit", arrays=job_zip(job_dir)).fields["job_id"]
        first.start()
        second.start()
        token = make_web_token(load_kit(kits / ADMIN))
        pin = spki_pin(load_kit(kits / "server").cert)
        url = f"https://localhost:{server.live.port}/?token={token}"
        with chrome(f"--ignore-certificate-errors-spki-list={pin}") as driver:
            driver.get(url)
            assert "token=" not in driver.current_url  # the token went into a cookie
            # Held by site-1 in round 2 (index 1): the page says so.
            wait_until(lambda: round_shown(driver, job_id) == "2", 30, "round 2 on the page")
            first.gate.set()
            # Then site-2 holds round 3: the page follows by itself (it polls).
            wait_until(lambda: round_shown(driver, job_id) == "3", 30, "round 3 on the page")
            metrics = server.workspace / "jobs" / job_id / "server" / "metrics.jsonl"
            records = [json.loads(line) for line in metrics.read_text().splitlines()]
            assert [r["round"] for r in records] == [0, 1]
            loaded = (
                "const i = document.getElementById('curves-' + arguments[0]);"
                "return !!(i && i.complete && i.naturalWidth > 0);"
            )
            wait_until(lambda: driver.execute_script(loaded, job_id), 30, "the curves")
            vertices = curve_vertices(driver, job_id)
            # One vertex per round done, on the global line and on each site's.
            assert vertices["series-global-train-accuracy"] == len(records) == 2
            assert vertices["series-site-train-accuracy-site-1"] == 2
            assert vertices["series-site-train-accuracy-site-2"] == 2
            sites_text = driver.find_element("id", "sites").text
            assert "site-1" in sites_text and "site-2" in sites_text
            shot = full_screenshot(driver, kits.parent / "live.png")
            assert non_blank(shot)
            if os.environ.get("FEDLIFT_LIVE_SCREENSHOT"):
                (ROOT / os.environ["FEDLIFT_LIVE_SCREENSHOT"]).write_bytes(shot)
            second.gate.set()
            wait_until(lambda: "finished" in driver.find_element("id", "jobs").text, 30, "finished")
    finally:
        for site in (first, second):
            site.finish()
        admin.close()


def test_a_browser_without_a_token_is_refused(deployment: tuple[Path, DeployServer]) -> None:
    kits, server = deployment
    pin = spki_pin(load_kit(kits / "server").cert)
    with chrome(f"--ignore-certificate-errors-spki-list={pin}") as driver:
        driver.get(f"https://localhost:{server.live.port}/")
        body = driver.find_element("tag name", "body").text
        assert body.startswith("403 Forbidden") and "fedlift web-token" in body
        driver.get(f"https://localhost:{server.live.port}/?token=v1.forged.token")
        assert driver.find_element("tag name", "body").text.startswith("403 Forbidden")


def test_the_live_page_of_a_poc_job(tmp_path: Path) -> None:
    """`fedlift poc start --web`: real server and site processes, a real job of scripts,
    and the link the command prints, opened in Chromium."""
    from test_deploy_e2e import fedlift, job_id_of, numpy_job

    ws = tmp_path / "poc"
    started = fedlift("poc", "start", "-n", "2", "--web", "--workspace", str(ws))
    assert started.returncode == 0, started.stderr
    link = next(
        line.split()[-1] for line in started.stdout.splitlines() if line.startswith("Live view:")
    )
    state = json.loads((ws / "poc.json").read_text())
    assert link.startswith(f"{state['web']}?token=")
    try:
        kit = ["--kit", state["admin_kit"]]
        deadline = time.monotonic() + 60
        while fedlift("job", "list", *kit).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.3)  # the server is starting
        job = numpy_job(tmp_path, 3, script_args="--sleep 1.5")
        job_id = job_id_of(fedlift("job", "submit", str(job), *kit))
        pin = spki_pin(Path(state["kits"]["server"]) / "cert.pem")
        with chrome(f"--ignore-certificate-errors-spki-list={pin}") as driver:
            driver.get(link)
            seen: list[str] = []

            def advanced() -> bool:
                shown = round_shown(driver, job_id)
                if shown and (not seen or seen[-1] != shown):
                    seen.append(shown)
                return len(seen) >= 2

            wait_until(advanced, 90, "the round to advance on the page")
            assert [int(r) for r in seen] == sorted(int(r) for r in seen), seen
            wait_until(lambda: "finished" in driver.find_element("id", "jobs").text, 90, "finished")
    finally:
        stopped = fedlift("poc", "stop", "--workspace", str(ws))
    assert stopped.returncode == 0, stopped.stderr
