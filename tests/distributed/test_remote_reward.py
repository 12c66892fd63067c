"""`RemoteReward` against `diffalign serve-reward` on loopback: the same scores as in process, retries
that survive a server restart, and requests the server refuses with a 4xx instead of crashing."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from diffalign.core.remote_reward import RemoteReward, WireFormatError, decode, encode
from diffalign.core.reward import (
    GuardedReward,
    Reward,
    RewardError,
    RewardOutput,
    RewardUnavailableError,
    SampleView,
    WeightedSum,
)
from diffalign.core.serve_reward import RewardServer
from diffalign.core.types import as_cond
from diffalign.rewards.toy import TargetRegion

pytestmark = pytest.mark.timeout(300)


class PerElement(Reward):
    """A reward with per-element scores, a reduction, a decode request and per-sample info."""

    reduction = "min"

    def __init__(self) -> None:
        super().__init__(name="per_element", request={"part": "all"})

    def forward(self, samples, cond):
        x = torch.as_tensor(samples).float()
        return RewardOutput(x, {"norm": x.norm(dim=1), "label": cond["label"].float()})


class Fails(Reward):
    def forward(self, samples, cond):
        if (torch.as_tensor(samples)[:, 0] > 0).any():
            raise ValueError("positive first coordinate")
        return torch.zeros(len(samples))


@pytest.fixture
def serve():
    servers = []

    def start(reward, **kwargs):
        server = RewardServer(reward, port=kwargs.pop("port", 0), **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _batch(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g) * 2
    cond = as_cond({"label": torch.arange(n) % 4, "prompt": [int(i % 4) for i in range(n)]})
    return x, cond


def test_the_wire_format_round_trips_without_pickle():
    payload = {
        "x": torch.randn(3, 2),
        "ids": torch.arange(3),
        "ok": torch.tensor([True, False, True]),
        "half": torch.ones(2, dtype=torch.bfloat16),
        "prompts": ["a 3", {"digit": 3, "speed": "fast"}, None],
        "nested": [np.zeros((2, 2), dtype=np.float16), 1.5],
    }
    back = decode(encode(payload))
    assert torch.equal(back["x"], payload["x"]) and torch.equal(back["ids"], payload["ids"])
    assert back["ok"].dtype == torch.bool and back["half"].dtype == torch.float32
    assert back["prompts"] == payload["prompts"] and back["nested"][1] == 1.5
    with pytest.raises(TypeError, match="cannot send a object"):
        encode({"x": object()})


@pytest.mark.parametrize(
    "body, match",
    [
        (b"hello world, not a body", "not a diffalign body"),
        (b"DAW1" + (10**9).to_bytes(8, "little") + b"{}", "exceeds the body"),
        (b"DAW1" + (2).to_bytes(8, "little") + b"{]", "unreadable header"),
    ],
)
def test_malformed_bodies_are_refused_by_name(body, match):
    with pytest.raises(WireFormatError, match=match):
        decode(body)


def test_an_object_array_is_refused_not_unpickled():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    blob = buf.getvalue()
    header = json.dumps({"tree": {"$array": 0}, "arrays": [[0, len(blob)]]}).encode()
    with pytest.raises(WireFormatError, match="not a plain .npy array"):
        decode(b"DAW1" + len(header).to_bytes(8, "little") + header + blob)


@pytest.mark.parametrize(
    "make",
    [
        TargetRegion,
        PerElement,
        lambda: WeightedSum([TargetRegion(), TargetRegion(center=[1.0, 1.0])], [1.0, 0.5]),
    ],
)
def test_remote_scores_equal_in_process_scores(serve, make):
    reward = make()
    server = serve(make())
    remote = RemoteReward(server.url, batch_size=3)  # 10 rows in 4 requests
    x, cond = _batch()
    here = reward.evaluate(SampleView.of(x), cond)
    there = remote.evaluate(SampleView.of(x), cond)
    assert torch.equal(there.scores, here.scores)
    assert there.info.keys() == here.info.keys()
    for k in here.info:
        assert torch.equal(torch.as_tensor(there.info[k]), torch.as_tensor(here.info[k])), k
    assert remote.name == reward.name and remote.request == reward.request
    assert remote.reduction == reward.reduction


def test_a_failing_reward_gets_422_and_the_guard_finds_the_rows(serve):
    server = serve(Fails())
    x, cond = _batch()
    with pytest.raises(RewardError, match="positive first coordinate"):
        RemoteReward(server.url).evaluate(SampleView.of(x), cond)
    scored = GuardedReward(RemoteReward(server.url), on_invalid="drop")(SampleView.of(x), cond)
    assert torch.equal(scored.keep, x[:, 0] <= 0)


def test_a_bad_token_is_refused(serve):
    server = serve(TargetRegion(), token="s3cret")
    x, cond = _batch()
    with pytest.raises(RewardUnavailableError, match="401.*token"):
        RemoteReward(server.url, token="wrong", retries=0).evaluate(SampleView.of(x), cond)
    with pytest.raises(RewardUnavailableError, match="401"):
        RemoteReward(server.url, token="", retries=0).evaluate(SampleView.of(x), cond)
    ok = RemoteReward(server.url, token="s3cret").evaluate(SampleView.of(x), cond)
    assert torch.equal(ok.scores, TargetRegion().evaluate(SampleView.of(x), cond).scores)


def _post(server, body: bytes, headers=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("POST", "/score", body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"{}")


def test_oversized_and_malformed_requests_get_4xx_and_the_server_lives_on(serve):
    server = serve(TargetRegion(), max_request_bytes=4096)
    x, cond = _batch(200)
    with pytest.raises(RewardUnavailableError, match="413.*lower batch_size"):
        RemoteReward(server.url, batch_size=200, retries=0).evaluate(SampleView.of(x), cond)
    status, reply = _post(server, b"garbage that is no body")
    assert status == 400 and "malformed request" in reply["error"]
    status, reply = _post(server, encode({"samples": torch.zeros(2, 2)}))  # no conditions
    assert status == 400 and "cond" in reply["error"]
    status, reply = _post(server, encode({"samples": torch.zeros(2, 5), "cond": {"label": torch.zeros(2)}}))
    assert status == 422  # the reward's own error about the samples, reported
    ok = RemoteReward(server.url, batch_size=20).evaluate(SampleView.of(x), cond)  # still serving
    assert ok.scores.shape == (200,)


def test_an_unreachable_server_fails_naming_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket closes
    url = f"http://127.0.0.1:{port}"
    x, cond = _batch()
    t0 = time.perf_counter()
    with pytest.raises(RewardUnavailableError, match=f"{url} is unreachable after 3 attempts"):
        GuardedReward(RemoteReward(url, retries=2, backoff=0.01), on_invalid="drop")(SampleView.of(x), cond)
    assert time.perf_counter() - t0 < 10  # not retried sample by sample


def _toy_module(reward):
    from diffalign.core.algorithms import DDPO
    from diffalign.core.module import AlignmentModule
    from diffalign.core.policy import DiffusionPolicy
    from diffalign.modalities.toy import MixtureBackbone

    policy = DiffusionPolicy(MixtureBackbone(), num_steps=4)
    return AlignmentModule(policy, DDPO(advantages="batch"), reward, seed=3)


def _fit(reward, callbacks=()):
    from diffalign.core.data import PromptDataModule
    from tests.helpers import quiet_trainer

    module = _toy_module(reward)
    data = PromptDataModule(prompts=[0, 1, 2, 3], batch_size=8, batches_per_epoch=4, eval_seeds_per_prompt=1)
    quiet_trainer(max_epochs=1, callbacks=list(callbacks)).fit(module, data)
    return module


def test_a_server_killed_and_restarted_mid_run_is_survived(serve):
    from lightning.pytorch.callbacks import Callback

    first = serve(TargetRegion())
    port = first.server_address[1]
    restarted = []

    class Restart(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx != 2:
                return
            first.shutdown()
            first.server_close()  # the port refuses connections now

            def later():
                time.sleep(0.8)
                restarted.append(serve(TargetRegion(), port=port))

            threading.Thread(target=later, daemon=True).start()

    remote = RemoteReward(first.url, retries=6, backoff=0.1)
    trained = _fit(remote, [Restart()])
    assert restarted, "the server was never restarted"
    assert remote.info()["name"] == "target_region"
    reference = _fit(TargetRegion())
    a, b = trained.policy.state_dict(), reference.policy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same scores, so the same training
    assert trained.reward_queries == reference.reward_queries == 32


def test_the_serve_reward_command_serves_survives_sigkill_and_restart(tmp_path):
    config = tmp_path / "reward.yaml"
    config.write_text(
        "reward:\n  class_path: diffalign.rewards.toy.TargetRegion\n  init_args: {radius: 1.5}\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DIFFALIGN_REWARD_TOKEN": "tok", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "diffalign.core", "serve-reward", "--config", str(config)]
    command += ["--port", str(port)]

    def launch():
        return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)

    x, cond = _batch(16)
    expected = TargetRegion(radius=1.5).evaluate(SampleView.of(x), cond).scores
    remote = RemoteReward(f"http://127.0.0.1:{port}", token="tok", retries=12, backoff=0.25, batch_size=4)
    server = launch()
    try:
        assert torch.equal(remote.evaluate(SampleView.of(x), cond).scores, expected)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        result: list = []
        caller = threading.Thread(target=lambda: result.append(remote.evaluate(SampleView.of(x), cond)))
        caller.start()  # retries while nothing listens
        time.sleep(0.5)
        server = launch()
        caller.join(timeout=120)
        assert result and torch.equal(result[0].scores, expected)
        status = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        status.request("GET", "/info")  # no token
        assert status.getresponse().status == 401
    finally:
        server.kill()
        server.wait(timeout=30)
    assert "serving reward 'target_region'" in (server.stderr.read() if server.stderr else "")


class SlowRecording(Reward):
    """TargetRegion that takes its time and records which thread scored and when."""

    def __init__(self, delay: float) -> None:
        super().__init__(name="target_region")
        self.inner, self.delay, self.calls = TargetRegion(), delay, []

    def forward(self, samples, cond):
        start = time.perf_counter()
        time.sleep(self.delay)
        self.calls.append((threading.current_thread() is threading.main_thread(), start, len(cond)))
        return self.inner(samples, cond)


def test_rollouts_are_scored_while_the_next_chunk_samples():
    from diffalign.core.reward import GuardedReward
    from diffalign.core.rollouts import AlignContext, collect_rollouts

    module = _toy_module(TargetRegion())
    batch = {"prompt": [0, 1, 2, 3] * 4}
    out = {}
    for chunks in (1, 4):
        reward = SlowRecording(delay=0.05)
        ctx = AlignContext(
            module.policy,
            GuardedReward(reward),
            torch.Generator().manual_seed(5),
            torch.device("cpu"),
            rollout_chunk_size=32 // chunks,
            async_reward=chunks > 1,
        )
        out[chunks] = (collect_rollouts(ctx, batch, repeat=2, shared_noise=True), reward.calls)
    (one, m1), calls1 = out[1]
    (four, m4), calls4 = out[4]
    # the same rows from the same seeds; batched matmuls of other sizes round differently (~1e-6)
    assert torch.allclose(one.states, four.states, atol=1e-5)
    assert torch.allclose(one.rewards, four.rewards, atol=1e-5)
    assert one.extras["group"].tolist() == four.extras["group"].tolist()
    assert m1 == pytest.approx(m4, abs=1e-5)
    assert [c[2] for c in calls4] == [8, 8, 8, 8]  # 4 chunks of whole groups (4 conditions x 2)
    assert not any(main for main, _, _ in calls4) and calls1[0][0]  # scored off the main thread
