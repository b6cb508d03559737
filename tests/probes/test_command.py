"""``infermon probe record`` and ``infermon probe check`` as real processes against a real model server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import Serve
from tests.helpers import TIMEOUT, free_port
from tests.probes.model import IRIS_V1, SETOSA, VIRGINICA, Model
from tests.test_cli import REPO, clean_env

V1_REQUEST: dict[str, Any] = {"name": "iris-v1", "path": "/v1/models/iris:predict", "body": IRIS_V1["body"]}
V2_REQUEST: dict[str, Any] = {
    "name": "iris-v2",
    "path": "/v2/models/iris/infer",
    "headers": {"Authorization": "Bearer ${PROBE_TOKEN}"},
    "body": {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]},
}
CHAT_REQUEST: dict[str, Any] = {
    "name": "chat-hello",
    "path": "/v1/chat/completions",
    "body": {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}]},
    "expect": {"conditions": [{"path": "$.choices[0].message.content", "type": "string", "min_length": 1}]},
}


async def infermon(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The command as a child process (the model server keeps running on this test's loop)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or clean_env(PROBE_TOKEN="t0ken"),
        cwd=REPO,
    )
    try:
        async with asyncio.timeout(TIMEOUT * 3):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write(path: Path, *objs: dict[str, Any]) -> str:
    path.write_text("".join(orjson.dumps(o).decode() + "\n" for o in objs))
    return str(path)


def read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_text().splitlines()]


async def test_record_then_check_round_trip(serve: Serve, tmp_path: Path) -> None:
    m = Model()
    url = await serve(m.app())
    requests = write(tmp_path / "requests.jsonl", V1_REQUEST, V2_REQUEST, CHAT_REQUEST)
    out = tmp_path / "probes.jsonl"
    rc, stdout, stderr = await infermon("probe", "record", "--upstream", url, "--requests", requests, "--out", str(out))
    assert rc == 0, stderr
    assert f"wrote 3 probes to {out}" in stdout
    v1, v2, chat = read(out)
    assert v1["expect"] == {
        "status": 200,
        "json": {"predictions": [SETOSA, VIRGINICA]},
        "rel_tol": 1e-5,
        "abs_tol": 1e-7,
    }
    assert v2["headers"] == {"Authorization": "Bearer ${PROBE_TOKEN}"}  # written as it was, never the token
    assert v2["expect"]["ignore"] == ["$.id"]  # a new id in every answer
    assert v2["expect"]["json"]["outputs"][0]["data"] == SETOSA
    assert chat["expect"]["conditions"] == CHAT_REQUEST["expect"]["conditions"]  # the line's own are kept
    assert chat["expect"]["ignore"] == ["$.choices[0].message.content", "$.created", "$.id"]
    assert "t0ken" not in out.read_text()
    assert len(m.seen) == 6  # --repeat 2
    assert m.seen[2][2]["authorization"] == "Bearer t0ken"

    rc, stdout, stderr = await infermon("probe", "check", str(out), "--upstream", url)
    assert rc == 0, stdout + stderr
    lines = stdout.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [
        ["PASS", "iris-v1"],
        ["PASS", "iris-v2"],
        ["PASS", "chat-hello"],
    ]
    assert lines[3] == f"3 probes against {url}: 3 passed, 0 failed"

    m.mode = "wrong"
    rc, stdout, stderr = await infermon("probe", "check", str(out), "--upstream", url)
    assert rc == 1, stdout + stderr
    assert "FAIL  iris-v1" in stdout
    assert "json $.predictions[0][0]: expected 0.97, got 0.01 (differs by 0.96; rel_tol 1e-05, abs_tol 1e-07)" in stdout
    assert "json $.outputs[0].data[0]: expected 0.97, got 0.01" in stdout
    assert 'json $.choices[0].finish_reason: expected "stop", got "length"' in stdout
    assert stdout.splitlines()[-1] == f"3 probes against {url}: 0 passed, 3 failed"

    rc, stdout, _ = await infermon("probe", "check", str(out), "--upstream", url, "--json")
    assert rc == 1
    report = orjson.loads(stdout)
    assert (report["passed"], report["failed"]) == (0, 3)
    first = report["probes"][0]["mismatches"][0]
    assert (first["path"], first["expected"], first["got"]) == ("$.predictions[0][0]", 0.97, 0.01)


async def test_record_options_and_a_re_recording(serve: Serve, tmp_path: Path) -> None:
    m = Model()
    url = await serve(m.app())
    requests = write(tmp_path / "requests.jsonl", CHAT_REQUEST)
    out = tmp_path / "probes.jsonl"
    rc, _, stderr = await infermon(
        "probe", "record", "--upstream", url, "--requests", requests, "--out", str(out),
        "--repeat", "1", "--ignore", "$.model", "--match", "json",
    )  # fmt: skip
    assert rc == 0, stderr
    [chat] = read(out)
    assert chat["expect"]["ignore"] == ["$.model"]  # one answer: nothing seen to differ
    # a recorded file is a requests file too: recorded again, its answers are replaced, the rest kept
    again = tmp_path / "again.jsonl"
    rc, _, stderr = await infermon(
        "probe", "record", "--upstream", url, "--requests", str(out), "--out", str(again), "--match", "status"
    )
    assert rc == 0, stderr
    [chat2] = read(again)
    assert chat2["expect"]["status"] == 200 and chat2["expect"]["ignore"] == ["$.model"]
    rc, stdout, stderr = await infermon("probe", "record", "--upstream", url, "--requests", requests, "--out", "-")
    assert rc == 0 and stdout.count("\n") == 1 and "wrote 1 probes to -" in stderr


async def test_record_never_writes_a_token_from_the_environment_that_the_answer_echoes(
    serve: Serve, tmp_path: Path
) -> None:
    m = Model()
    url = await serve(m.app())
    token = "s3cret-t0ken-from-a-k8s-secret"
    request = {"name": "whoami", "path": "/whoami", "headers": {"Authorization": "Bearer ${PROBE_TOKEN}"}}
    requests = write(tmp_path / "requests.jsonl", request)
    out = tmp_path / "probes.jsonl"
    env = clean_env(PROBE_TOKEN=token)
    rc, stdout, stderr = await infermon(
        "probe", "record", "--upstream", url, "--requests", requests, "--out", str(out), env=env
    )
    assert rc == 0, stderr
    assert token not in out.read_text() and token not in stdout + stderr
    [probe] = read(out)
    assert probe["expect"]["json"]["caller"] == {"auth": "<redacted: ${PROBE_TOKEN}>", "role": "reader"}
    assert probe["expect"]["ignore"] == ["$.caller.auth"]
    assert "redacted (they hold the value of ${PROBE_TOKEN}): $.caller.auth" in stdout
    rc, stdout, stderr = await infermon("probe", "check", str(out), "--upstream", url, env=env)
    assert rc == 0, stdout + stderr  # the rest of the answer is still compared


async def test_record_refuses_a_server_that_is_not_good(serve: Serve, tmp_path: Path) -> None:
    m = Model()
    m.mode = "error"
    url = await serve(m.app())
    requests = write(tmp_path / "requests.jsonl", V1_REQUEST)
    out = tmp_path / "probes.jsonl"
    rc, _, stderr = await infermon("probe", "record", "--upstream", url, "--requests", requests, "--out", str(out))
    assert rc == 1
    assert f"{requests}:1: iris-v1: status: expected 2xx, got 500" in stderr
    assert "nothing written" in stderr
    assert not out.exists()


async def test_a_server_that_cannot_be_reached(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    probes = write(tmp_path / "probes.jsonl", IRIS_V1)
    rc, stdout, _ = await infermon("probe", "check", probes, "--upstream", url)
    assert rc == 1
    assert "FAIL  iris-v1    -" in stdout and "connect:" in stdout
    rc, _, stderr = await infermon("probe", "record", "--upstream", url, "--requests", probes, "--out", "-")
    assert rc == 1 and "iris-v1: connect:" in stderr


async def test_bad_files_and_usage_exit_2_with_one_message(tmp_path: Path) -> None:
    bad = tmp_path / "probes.jsonl"
    bad.write_text(orjson.dumps(IRIS_V1).decode() + '\n{"path": "/x", "expct": {}}\n')
    rc, stdout, stderr = await infermon("probe", "check", str(bad), "--upstream", "http://127.0.0.1:1")
    assert rc == 2 and stdout == ""
    assert stderr.splitlines() == [
        f"{bad}:2: unknown key 'expct' in the probe (known: name, method, path, headers, body, body_text, expect)"
    ]
    rc, _, stderr = await infermon("probe", "record", "--upstream", "http://127.0.0.1:1", "--requests", str(bad),
                                   "--out", "-")  # fmt: skip
    assert rc == 2 and f"{bad}:2: unknown key 'expct'" in stderr
    rc, _, stderr = await infermon("probe", "check", str(tmp_path / "none.jsonl"), "--upstream", "http://127.0.0.1:1")
    assert rc == 2 and "cannot read the probe file" in stderr
    rc, _, stderr = await infermon("probe", "check", str(bad), "--upstream", "ftp://x")
    assert rc == 2 and stderr.startswith("config error: --upstream 'ftp://x' must be an http:// or https:// URL")
    rc, _, stderr = await infermon("probe", "check", str(bad))
    assert rc == 2 and "--upstream" in stderr  # argparse: a usage error
    rc, _, stderr = await infermon(
        "probe", "record", "--upstream", "http://127.0.0.1:1", "--requests", str(bad), "--out", "-", "--ignore", "id"
    )
    assert rc == 2 and "must start with '$'" in stderr
    # the proxy refuses the same file at start-up, naming the key, the flag, the file and the line
    rc, _, stderr = await infermon("proxy", "--probes", str(bad), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    assert rc == 2
    [line] = stderr.splitlines()
    assert line.startswith(f"config error: probes.file = '{bad}' (from flag --probes): ")
    assert line.endswith(f"{bad}:2: unknown key 'expct' in the probe (known: name, method, path, headers, body, "
                         "body_text, expect)")  # fmt: skip
