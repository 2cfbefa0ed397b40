"""A fresh clone: plain `docker compose up -d --wait` builds the image from the repository with its
packages from a package index (no wheelhouse), generates the credentials and comes up healthy.

This machine's containers reach no package index, so the test stands one up on loopback: a PEP 503
"simple" index made of the wheelhouse's dependency wheels (not the project's own wheel: the
project must be built from the clone's sources), and the build runs on the host network to reach
it (PIP_INDEX_URL, MVC_BUILD_NETWORK=host). The wheelhouse path is what every other e2e test uses.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import threading
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from e2e_stack import REPO, WHEELHOUSE, clean_env, log, sh

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _fresh_clone(dest: Path) -> Path:
    """The repository as `git clone` gives it, with the working tree's changes: tracked and
    untracked-but-not-ignored files (no build/, .venv, .env, runtime/, certs/)."""
    files = sh(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for name in filter(None, files.split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    assert not (dest / "build").exists() and (dest / "docker" / "Dockerfile").exists()
    return dest


def _simple_index(root: Path) -> Path:
    """A PEP 503 index of the wheelhouse's dependency wheels under root/simple/."""
    wheels = [w for w in WHEELHOUSE.glob("*.whl") if not w.name.startswith("remote_mvc-")]
    assert wheels, "the wheelhouse is empty (the e2e_images fixture fills it)"
    by_project: dict[str, list[Path]] = {}
    for wheel in wheels:
        project = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
        by_project.setdefault(project, []).append(wheel)
    simple = root / "simple"
    for project, files in by_project.items():
        page = simple / project
        page.mkdir(parents=True)
        for f in files:
            shutil.copy2(f, page / f.name)
        links = "".join(f'<a href="{f.name}">{f.name}</a>\n' for f in files)
        (page / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    (simple / "index.html").write_text(
        "<!DOCTYPE html><html><body>\n" + "".join(f'<a href="{p}/">{p}</a>\n' for p in by_project)
        + "</body></html>\n")
    return simple


@pytest.fixture
def local_index(tmp_path):
    simple = _simple_index(tmp_path / "index")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(simple.parent))
    handler.log_message = lambda *a: None  # type: ignore[assignment]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()


def test_plain_compose_up_from_a_fresh_clone_builds_from_a_package_index(e2e_images, local_index, tmp_path):
    clone = _fresh_clone(tmp_path / "clone")
    base = e2e_images["BASE_IMAGE"]
    if base == "unused":  # E2E_REUSE_IMAGES=1 skipped the fixture's choice
        base = sh(["bash", "docker/base-image.sh"], timeout=1200).stdout.strip().splitlines()[-1]
    tag = f"fresh{uuid.uuid4().hex[:6]}"
    images = {"REMOTE_MVC_IMAGE": f"remote-mvc:{tag}", "PROMETHEUS_IMAGE": f"remote-mvc/prometheus:{tag}",
              "ALERTMANAGER_IMAGE": f"remote-mvc/alertmanager:{tag}"}
    env = clean_env({**images, "BASE_IMAGE": base, "PIP_INDEX_URL": local_index, "MVC_BUILD_NETWORK": "host",
                     "VIEWERS": "1", "PROMETHEUS_PORT": "", "ALERTMANAGER_PORT": ""})
    project = f"mvcfresh{uuid.uuid4().hex[:6]}"
    compose = ["docker", "compose", "-p", project]
    try:
        log(f"{project}: docker compose up -d --wait in a fresh clone (index {local_index})")
        up = subprocess.run([*compose, "up", "-d", "--wait", "--wait-timeout", "400"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=900)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        built = up.stdout + up.stderr
        assert "no wheelhouse; packages from " + local_index in built, built[-3000:]
        ps = subprocess.run([*compose, "ps", "--format", "{{.Service}} {{.Health}}"], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=60).stdout.split("\n")
        states = dict(line.split(" ", 1) for line in ps if line.strip())
        for service in ("nameserver", "model", "ticker", "viewer", "prometheus", "alertmanager"):
            assert states.get(service) == "healthy", states
        query = subprocess.run([*compose, "run", "--rm", "-T", "controller", "remote-mvc-ctl", "set", "value=5"],
                               cwd=clone, env=env, capture_output=True, text=True, timeout=120)
        assert query.returncode == 0 and query.stdout.strip().splitlines()[-1] == "revision 1", query.stderr
        version = subprocess.run([*compose, "run", "--rm", "-T", "--no-deps", "controller", "remote-mvc-ctl",
                                  "version", "-o", "json"], cwd=clone, env=env, capture_output=True, text=True,
                                 timeout=120)
        assert version.returncode == 0, version.stderr
        assert json.loads(version.stdout.strip().splitlines()[-1])["remote-mvc"] != "unknown"
    finally:
        subprocess.run([*compose, "--profile", "*", "down", "--volumes", "--remove-orphans", "--timeout", "10"],
                       cwd=clone, env=env, capture_output=True, timeout=180)
        subprocess.run(["docker", "image", "rm", *images.values()], capture_output=True, timeout=120)
