"""The server started the way the serving image and the Deployment start it, without Docker:
the image's ENV, the Deployment's args, and a home directory it cannot write (the image's user
has none, and the pod's root filesystem is read-only). Only the ports, the repository, the host
and the device are changed, to run here."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests.deploy.test_manifests import _dockerfile
from tests.serve.conftest import free_ports, make_classifier
from tests.serve.procs import probe_until_serving

ROOT = Path(__file__).resolve().parents[2]


def _image_env() -> dict[str, str]:
    """The serving stage's ENV (PATH aside, which names the image's virtual environment)."""
    env: dict[str, str] = {}
    for instruction, rest in _dockerfile()["serve"]:
        if instruction == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
    env.pop("PATH")
    return env


def _deployment_args() -> list[str]:
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return [str(arg) for arg in container["args"]]


def test_deployment_command_logs_only_json_with_an_unwritable_home(tmp_path: Path) -> None:
    """`--log-format json` promises one JSON object per line to log collectors. With no
    writable home, onnxruntime-gpu's telemetry printed a coloured warning line of its own
    ("Failed to persist telemetry device ID") at every start; the image turns it off."""
    repository = tmp_path / "models"
    (repository / "tiny" / "1").mkdir(parents=True)
    make_classifier(repository / "tiny" / "1" / "model.onnx")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a home below a file cannot be created, not even by root
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **_image_env()}
    env["HOME"] = str(blocker / "home")
    port, metrics_port = free_ports(2)
    args = _deployment_args()
    assert "--log-format" in args and args[args.index("--log-format") + 1] == "json"
    # argparse keeps the last value of a repeated option: these override the manifest's.
    args += ["--model-repository", str(repository), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", str(metrics_port), "--device", "cpu"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve", *args], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:
        probe = [sys.executable, "-m", "serve.health", f"127.0.0.1:{port}", "--timeout", "4"]
        done = probe_until_serving(proc, probe, cwd=ROOT)
        assert done.returncode == 0, done.stderr + log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
