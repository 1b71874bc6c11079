"""Tests for scripts/ray_cluster.sh: syntax, argument checks, the job runtime_env, and a real local head node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "ray_cluster.sh"


def _ray_bin() -> str | None:
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else shutil.which("ray")


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bash_syntax():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_no_hard_coded_absolute_paths():
    text = SCRIPT.read_text()
    for bad in ("/work/", "/home/", "/root/", "/tmp/ray"):
        assert bad not in text


def test_help_lists_commands_and_settings():
    res = _run("--help")
    assert res.returncode == 0
    for word in ("head", "worker", "submit", "stop", "RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_JOB_ADDRESS"):
        assert word in res.stdout


def test_bad_usage_fails_with_a_message():
    res = _run()
    assert res.returncode == 2 and "Usage" in res.stderr
    res = _run("launch")
    assert res.returncode == 2 and "unknown command 'launch'" in res.stderr


def test_missing_ray_is_reported():
    res = _run("head", env={"RAY_BIN": "definitely-not-ray-xyz"})
    assert res.returncode == 2 and "'definitely-not-ray-xyz' not found" in res.stderr


@pytest.fixture
def fake_ray(tmp_path: Path) -> Path:
    """A stand-in `ray` that records its arguments and the runtime_env file it was given."""
    fake = tmp_path / "ray"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'printf "%s\\n" "$@" > "$FAKE_RAY_OUT/args"\n'
        'for a in "$@"; do case "$a" in\n'
        '  --runtime-env=*) cp "${a#--runtime-env=}" "$FAKE_RAY_OUT/env.json";;\n'
        "esac; done\n"
        'pwd > "$FAKE_RAY_OUT/cwd"\n'
    )
    fake.chmod(0o755)
    return fake


def test_head_keeps_the_dashboard_and_job_api_on_loopback_unless_asked(fake_ray, tmp_path):
    """The dashboard accepts job submissions (code execution): Ray binds it to 127.0.0.1 by default, so do we."""
    env = {"RAY_BIN": str(fake_ray), "FAKE_RAY_OUT": str(tmp_path), "RAY_HEAD_IP": "127.0.0.1"}
    res = _run("head", env=env)
    assert res.returncode == 0, res.stderr
    assert "--dashboard-host=127.0.0.1" in (tmp_path / "args").read_text().split()
    assert "http://127.0.0.1:8265" in res.stdout
    res = _run("head", env={**env, "RAY_DASHBOARD_HOST": "0.0.0.0"})  # a trusted network, on purpose
    assert "--dashboard-host=0.0.0.0" in (tmp_path / "args").read_text().split()


@pytest.mark.parametrize("argv, message", [
    (("worker",), "needs the head address"),
    (("worker", "not-an-address"), "HOST:PORT"),
    (("submit",), "needs a recipe"),
    (("submit", "recipe/does_not_exist.sh"), "recipe not found"),
])
def test_bad_arguments_exit_2_naming_what_is_wrong(fake_ray, tmp_path, argv, message):
    res = _run(*argv, env={"RAY_BIN": str(fake_ray), "FAKE_RAY_OUT": str(tmp_path)})
    assert res.returncode == 2 and message in res.stderr


def test_worker_joins_the_head_address(fake_ray, tmp_path):
    env = {"RAY_BIN": str(fake_ray), "FAKE_RAY_OUT": str(tmp_path)}
    res = _run("worker", "10.0.0.1:6379", env={**env, "RAY_NUM_GPUS": "8"})
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "args").read_text().split() == ["start", "--address=10.0.0.1:6379", "--num-gpus", "8"]


def test_submit_ships_the_checkout_and_the_plugin(fake_ray, tmp_path):
    env = {
        "RAY_BIN": str(fake_ray),
        "FAKE_RAY_OUT": str(tmp_path),
        "PYTHON_BIN": sys.executable,
        "RAY_DASHBOARD_PORT": "18265",
        "WANDB_API_KEY": "secret-for-test",
        "RAY_AUTH_MODE": "disabled",
        "DATA_DIR": "/shared/erc_data",
        "CKPT_DIR": "/shared/ckpts",
        "MODEL_SIZE": "7b",  # a knob recipe/*.sh reads: forwarded without being listed
    }
    recipe = os.path.relpath(SCRIPT, os.getcwd())  # any file inside the repo stands in for a recipe
    res = _run("submit", recipe, "trainer.nnodes=2", "data.train_files=[a,b]", env=env)
    assert res.returncode == 0, res.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:3] == ["job", "submit", "--address=http://127.0.0.1:18265"]
    assert args[-4:] == ["bash", "scripts/ray_cluster.sh", "trainer.nnodes=2", "data.train_files=[a,b]"]
    assert args[-5] == "--"
    assert (tmp_path / "cwd").read_text().strip() == str(REPO)
    runtime_env = json.loads((tmp_path / "env.json").read_text())
    assert runtime_env["working_dir"] == str(REPO)
    assert runtime_env["env_vars"]["VERL_USE_EXTERNAL_MODULES"] == "erc_verl.algorithm.losses"
    assert runtime_env["env_vars"]["WANDB_API_KEY"] == "secret-for-test"
    if list((REPO / "recipe").glob("*.sh")):
        assert runtime_env["env_vars"]["MODEL_SIZE"] == "7b"
        assert runtime_env["env_vars"]["DATA_DIR"] == "/shared/erc_data"
    assert "not an absolute path" not in res.stderr
    assert {".git", ".venv", "data"} <= set(runtime_env["excludes"])
    assert "pip" not in runtime_env
    assert not [
        p
        for p in os.listdir(tempfile.gettempdir())
        if p.startswith("erc_runtime_env.") and (Path(tempfile.gettempdir()) / p).stat().st_mtime > time.time() - 5
    ], "temp env file left behind"

    res = _run(
        "submit", recipe, env={**env, "ERC_RAY_PIP": "sympy==1.14.0", "RAY_JOB_NO_WAIT": "1", "DATA_DIR": "data/erc"}
    )
    assert res.returncode == 0, res.stderr
    assert "DATA_DIR='data/erc' is not an absolute path" in res.stderr
    assert json.loads((tmp_path / "env.json").read_text())["pip"] == ["sympy==1.14.0"]
    assert "--no-wait" in (tmp_path / "args").read_text().split()


def test_submit_rejects_recipes_outside_the_repo(fake_ray, tmp_path):
    env = {"RAY_BIN": str(fake_ray), "FAKE_RAY_OUT": str(tmp_path)}
    outside = tmp_path / "outside.sh"
    outside.write_text("echo hi\n")
    res = _run("submit", str(outside), env=env)
    assert res.returncode == 2 and "must live inside this repo" in res.stderr
    assert not (tmp_path / "args").exists()


@pytest.mark.integration
def test_real_local_head_starts_and_stops():
    ray_bin = _ray_bin()
    if ray_bin is None:
        pytest.skip("ray CLI not installed")
    port = _free_port()
    # A private temp dir (short: Ray puts unix sockets in it) and private ports, so this never touches
    # another Ray instance on the machine; the head runs with --block in its own process group, and
    # only that group is stopped (never a global `ray stop`).
    temp_dir = tempfile.mkdtemp(prefix="ercray", dir="/tmp")
    extra = [
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        "--disable-usage-stats",
        "--block",
    ]
    env = {
        **os.environ,
        "RAY_BIN": ray_bin,
        "RAY_HEAD_IP": "127.0.0.1",
        "RAY_PORT": str(port),
        "RAY_DASHBOARD_PORT": str(_free_port()),
        "RAY_NUM_CPUS": "1",
    }
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(
        ["bash", str(SCRIPT), "head", *extra], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        status = None
        while time.monotonic() < deadline:
            assert head.poll() is None, open(os.path.join(temp_dir, "head.log")).read()[-3000:]
            status = subprocess.run(
                ["bash", str(SCRIPT), "status", f"--address=127.0.0.1:{port}"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if status.returncode == 0 and "CPU" in status.stdout:
                break
            time.sleep(2)
        assert status is not None and status.returncode == 0, status.stderr[-3000:]
        assert "0.0/1.0 CPU" in status.stdout
        assert f"Ray head: 127.0.0.1:{port}" in open(os.path.join(temp_dir, "head.log")).read()
    finally:
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            try:  # the leader is gone; make sure nothing else of the group survives
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    # The head (its GCS) is really gone: nothing accepts connections on its port any more.
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex(("127.0.0.1", port)) != 0
