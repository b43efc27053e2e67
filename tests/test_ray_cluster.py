"""Ray cluster workflows as the README gives them, run for real on this machine.

A head started with `ray start --head` (127.0.0.1 only, its own temp dir, ports and auth token) takes
stage 2 as `ray job submit --address http://127.0.0.1:PORT --working-dir . -- python pipeline/extract.py`;
a relative --out is refused inside that job; `--ray-address local` beside the head starts a private Ray;
an address nobody answers on fails within seconds. Only processes this module started are stopped
(never a bare `ray stop`, which ends every Ray on the machine): the head's process group, then every
process carrying this module's marker in its environment (job drivers run in sessions of their own).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipeline.raylib import JOB_ENV, check_job_paths
from pipeline.stage1 import TokenizeConfig
from pipeline.stage1 import run as tokenize
from sae import save_sae
from shards import load_manifest
from tests.helpers import owt_documents, random_sae, write_corpus

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = os.path.dirname(sys.executable)  # not resolved: a venv's python is a link to the base one
RAY = os.path.join(VENV_BIN, "ray")
MARKER = "COCOMIX_TEST_RAY_HEAD"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    """The first of ``n`` consecutive ports that are all free on 127.0.0.1 (Ray's worker ports)."""
    for _ in range(200):
        base = random.randrange(20000, 30000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address, the venv first on PATH (the job's `python`
    is the head's PATH's), everything on 127.0.0.1 (docs/operations.md, "Clusters"), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", JOB_ENV)}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)
    return env


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment carries ``MARKER=marker`` (only ours: a fresh uuid)."""
    needle = f"{MARKER}={marker}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                os.kill(int(d.name), signal.SIGKILL)
        except OSError:
            pass


# -- fast: no head -----------------------------------------------------------------------------


def test_packaging_installs_the_job_server_everywhere_the_readme_uses_it():
    """`ray job submit` needs ray[default] on the head (dashboard + job server); plain `ray` has none."""
    extras = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    assert re.search(r'^cluster = \[.*"ray\[default\]', extras, re.M)  # (tomllib is Python >= 3.11)
    installed = re.search(r'-e "\.\[([^\]]*)\]"', (REPO / "scripts" / "install.sh").read_text())
    assert installed and {"dev", "cluster"} <= set(installed.group(1).split(","))  # make install, hence CI
    assert "cluster]" in (REPO / "Dockerfile").read_text()  # the image of pipeline/cluster.yaml
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[cluster]"' in readme and "RAY_AUTH_MODE=token" in readme


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_cluster_configs_match_rays_schema(name):
    import jsonschema
    import ray.autoscaler
    import yaml

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "pipeline" / name).read_text())
    jsonschema.validate(config, schema)
    setup = "\n".join(config["setup_commands"])
    assert "ray.dashboard" in setup  # every node checks it has the job server (the image / install.sh: .[cluster])
    if "docker" not in config:  # `ray submit` runs the login shell's python: the venv must be on its PATH
        assert "scripts/install.sh ~/cocomix-venv" in setup and "activate' >> ~/.bashrc" in setup
    # One token everywhere: the nodes get the client's ~/.ray/auth_token, and workers must be told to use it.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmd in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert cmd.startswith("RAY_AUTH_MODE=token ray start")


def test_relative_paths_are_refused_inside_a_ray_job(monkeypatch, tmp_path):
    check_job_paths({"--out": "runs/x", "--corpus": ["hf:openwebtext"]})  # outside a job: as always
    monkeypatch.setenv(JOB_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"},
                                            "metadata": {"job_submission_id": "raysubmit_T"}}))
    check_job_paths({"--out": str(tmp_path), "--corpus": ["hf:openwebtext", str(tmp_path)], "--manifest": None})
    with pytest.raises(ValueError,
                       match=r"--corpus 'c\.txt' is a relative path.*raysubmit_T.*--corpus /mnt/efs/c\.txt"):
        check_job_paths({"--out": str(tmp_path), "--corpus": [str(tmp_path), "c.txt"]})
    # Both stages' CLIs refuse before any work: one `error:` line, exit 2, nothing written.
    from pipeline.extract import main as extract_main
    from pipeline.stage1 import main as tokenize_main

    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "c.txt", owt_documents(2))
    assert tokenize_main(["--corpus", str(corpus), "--tokenizer", "gpt2", "--out", "toks"]) == 2
    assert extract_main(["--tokens", str(tmp_path), "--teacher", "gpt2", "--sae", str(tmp_path), "--out", "o"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


def run_cli(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args[:2]} still running after {timeout} s")
    return r.returncode, r.stdout + r.stderr, time.monotonic() - t0


STALE = """
import json, sys, time
from pipeline.raylib import init_ray
out = {}
for address in sys.argv[1:]:
    t0 = time.monotonic()
    try:
        out[address] = init_ray(address or None)
    except ValueError as e:
        out[address] = "ValueError: " + str(e)
    out[address + " s"] = time.monotonic() - t0
print(json.dumps(out))
"""


def test_an_address_nobody_answers_on_fails_fast(tmp_path, tiny_tokenizer_dir):
    """ray.init retried an unreachable address for minutes; now: one `error:` line within seconds."""
    corpus = write_corpus(tmp_path / "c.txt", owt_documents(2))
    port = free_port()
    env = clean_env(RAY_TMPDIR=str(tmp_path))
    rc, out, seconds = run_cli(["-m", "pipeline.stage1", "--corpus", str(corpus),
                                "--tokenizer", str(tiny_tokenizer_dir), "--seq-len", "16",
                                "--out", str(tmp_path / "toks"), "--ray-address", f"127.0.0.1:{port}"],
                               env, 60)
    last = out.strip().splitlines()[-1]
    assert rc == 2 and seconds < 30 and "Traceback" not in out, out
    assert (last.startswith(f"error: --ray-address 127.0.0.1:{port}: no Ray cluster answers there")
            and "--ray-address local" in last)
    assert not (tmp_path / "toks" / "manifest.json").exists()
    # The default address finds the cluster that the last `ray start` on this machine recorded; a stale
    # record (its head is gone) is the same error, naming where the address came from. A dashboard URL is
    # the job server's address, not one for --ray-address.
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    rc, out, _ = run_cli(["-c", STALE, "", "http://127.0.0.1:8265"], {**env, "COCOMIX_RAY_CONNECT_TIMEOUT_S": "3"}, 60)
    res = json.loads(out.strip().splitlines()[-1])
    assert res[""].startswith(
        f"ValueError: the Ray cluster recorded in {tmp_path}/ray/ray_current_cluster by the last `ray start` "
        f"on this machine (127.0.0.1:{port}): no Ray cluster answers"
    ) and res[" s"] < 30, res
    assert res["http://127.0.0.1:8265"].startswith(
        "ValueError: --ray-address http://127.0.0.1:8265: that is a web address")


# -- a real head -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head():
    """`ray start --head` on 127.0.0.1 with fixed free ports, its own temp dir (RAY_TMPDIR) and auth token."""
    tmp = Path(tempfile.mkdtemp(prefix="crh", dir="/tmp"))  # short: Ray's socket paths live under it
    token = tmp / "auth_token"
    token.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
    marker = uuid.uuid4().hex
    ports = {name: free_port() for name in ("gcs", "dashboard", "client", "node_manager", "object_manager",
                                           "agent_listen", "agent_grpc", "runtime_env", "metrics")}
    workers = free_port_range(40)
    env = clean_env(RAY_TMPDIR=str(tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), **{MARKER: marker})
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]), "--include-dashboard", "true",
           "--ray-client-server-port", str(ports["client"]), "--node-manager-port", str(ports["node_manager"]),
           "--object-manager-port", str(ports["object_manager"]),
           "--dashboard-agent-listen-port", str(ports["agent_listen"]),
           "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
           "--runtime-env-agent-port", str(ports["runtime_env"]),
           "--metrics-export-port", str(ports["metrics"]), "--min-worker-port", str(workers),
           "--max-worker-port", str(workers + 39), "--num-cpus", "2", "--object-store-memory", str(100 << 20),
           "--disable-usage-stats"]  # no --temp-dir: RAY_TMPDIR/ray, where ray.init looks for `ray start`'s record
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    try:
        deadline = time.monotonic() + 180
        while True:  # the job server answers (with the token) once the dashboard's modules are up
            assert proc.poll() is None, (tmp / "head.log").read_text()[-3000:]
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{ports['dashboard']}/api/jobs/",
                                             headers={"Authorization": f"Bearer {token.read_text()}"})
                urllib.request.urlopen(req, timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, (
                    "head not up after 180 s:\n" + (tmp / "head.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"tmp": tmp, "token": token, "env": env, **ports}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its own processes
            proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        kill_marked(marker)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_teacher_dir):
    """Token shards (stage 1 in process: this module leaves the test process without Ray) and a tiny SAE."""
    root = tmp_path_factory.mktemp("cluster")
    corpus = write_corpus(root / "corpus.txt", [d[:600] for d in owt_documents(6)])
    tokenize(TokenizeConfig(corpus=[str(corpus)], tokenizer=str(tiny_teacher_dir), out=str(root / "tokens"), seq_len=16,
                            val_fraction=0.3, in_process=True))
    save_sae(random_sae(d=64, c=100, k=4, layer=1, seed=3), root / "sae")
    return root


def job_submit(head, entrypoint: list[str], timeout: float = 240) -> tuple[int, str]:
    """The README's form: ray job submit --address http://HEAD:8265 --working-dir . -- python pipeline/extract.py ..."""
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head["token"]), **{MARKER: head["env"][MARKER]})
    cmd = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{head['dashboard']}", "--working-dir", ".", "--",
           *entrypoint]
    try:
        r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ray job submit still running after {timeout} s: {e.stdout}")
    return r.returncode, r.stdout + r.stderr


def extract_args(inputs: Path, teacher: Path) -> list[str]:
    return ["python", "pipeline/extract.py", "--tokens", str(inputs / "tokens"), "--teacher", str(teacher),
            "--sae", str(inputs / "sae"), "--k-mix", "4", "--batch-size", "4", "--device", "cpu", "--num-workers", "1"]


def test_stage2_as_a_ray_job_on_a_local_head(head, inputs, tiny_teacher_dir, tmp_path):
    args = extract_args(inputs, tiny_teacher_dir)
    out_dir = tmp_path / "owt"
    rc, out = job_submit(head, [*args, "--out", str(out_dir), "--manifest", str(out_dir / "owt-l1.json")])
    assert rc == 0 and "succeeded" in out, out[-4000:]
    m = load_manifest(out_dir / "owt-l1.json")
    assert m.kind == "concepts" and m.stats["complete"] and m.sae["n_latents"] == 100
    assert {k: s.windows for k, s in m.splits.items()} == {
        k: s.windows for k, s in load_manifest(inputs / "tokens").splits.items()}
    assert f"manifest: {out_dir / 'owt-l1.json'}" in out  # printed absolute
    assert "Ray: cluster at 127.0.0.1:" in out, out[-4000:]  # the job's driver joined the head: logged as such


def test_a_relative_out_is_refused_inside_the_job(head, inputs, tiny_teacher_dir):
    """It would have landed in Ray's temporary copy of the working dir (and been lost): one error line."""
    rc, out = job_submit(head, [*extract_args(inputs, tiny_teacher_dir), "--out", "rel-out"])
    assert rc != 0 and (
        "error: --out 'rel-out' is a relative path, and this runs inside the Ray job raysubmit_" in out), out[-4000:]
    assert "Traceback" not in out and not list(
        head["tmp"].glob("ray/session_*/runtime_resources/working_dir_files/*/rel-out"))


PROBE = """
import json, logging, ray, sys
logging.basicConfig(level=logging.INFO)
from pipeline.raylib import init_ray
first = init_ray(sys.argv[1], num_cpus=1)
gcs = ray.get_runtime_context().gcs_address
print(json.dumps({"first": first, "again": init_ray(None), "gcs": gcs, "cpus": ray.cluster_resources().get("CPU")}))
"""


def test_ray_address_local_beside_a_head_starts_a_private_ray(head):
    """With the head's address in RAY_ADDRESS, --ray-address local still starts a Ray of its own; with no
    address on the head's machine (`ray submit`), the cluster `ray start` recorded is joined, and reported
    as "cluster", also by a second init_ray in the same process."""
    env = clean_env(RAY_TMPDIR=str(head["tmp"]), RAY_AUTH_TOKEN_PATH=str(head["token"]),
                    **{MARKER: head["env"][MARKER]})
    results = {}
    for address, extra in (("local", {"RAY_ADDRESS": f"127.0.0.1:{head['gcs']}", "RAY_AUTH_MODE": "token"}), ("", {})):
        rc, out, _ = run_cli(["-c", PROBE, address], {**env, **extra}, 120)
        assert rc == 0, out[-3000:]
        results[address] = {**json.loads(next(x for x in reversed(out.splitlines()) if x.startswith("{"))), "log": out}
    local, joined = results["local"], results[""]
    assert local["gcs"] != f"127.0.0.1:{head['gcs']}" and local["first"] == local["again"] == "embedded"
    assert local["cpus"] == 1 and "Ray: embedded, a private Ray started by this process" in local["log"]
    assert joined["gcs"] == f"127.0.0.1:{head['gcs']}" and joined["first"] == joined["again"] == "cluster"
    assert joined["cpus"] == 2 and f"Ray: cluster at 127.0.0.1:{head['gcs']}" in joined["log"]
