"""`diffalign serve-reward --config reward.yaml`: serve any `Reward` over HTTP for `RemoteReward`.

    diffalign serve-reward --config reward.yaml --port 8765            # 127.0.0.1 only, by default
    DIFFALIGN_REWARD_TOKEN=secret diffalign serve-reward --config reward.yaml --host 0.0.0.0

reward.yaml holds `reward: {class_path: ..., init_args: {...}}` (a sampling recipe's reward block works
too). Endpoints: `GET /health` (no token), `GET /info` (the reward's name, decode request and
reduction), `POST /score` (samples and conditions in the wire format of `core.remote_reward`; answers
the scores and the reward's info). With a token (--token or DIFFALIGN_REWARD_TOKEN) every endpoint but
/health wants `Authorization: Bearer <token>` (else 401). Requests larger than --max_request_mb get 413
before their body is read; a body that is not in the wire format gets 400; a reward that raises on the
samples gets 422 with its message. The reward runs one batch at a time.
"""

from __future__ import annotations

import hmac
import json
import os
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from diffalign.core.remote_reward import CONTENT_TYPE, TOKEN_ENV, WireFormatError, decode, encode
from diffalign.core.reward import Reward, RewardOutput
from diffalign.core.types import as_cond


class RewardServer(ThreadingHTTPServer):
    """An HTTP server scoring batches with `reward` (see the module docstring).

    Args:
        reward: the reward to serve.
        host, port: where to listen (port 0: any free port; see `url`).
        token: the bearer token clients must send (None: none needed).
        max_request_bytes: larger requests are refused with 413.
        device: where samples go before the reward sees them.
    """

    daemon_threads = True
    allow_reuse_address = True  # a restarted server gets its port back at once

    def __init__(
        self,
        reward: Reward,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str | None = None,
        max_request_bytes: int = 64 * 2**20,
        device: str = "cpu",
    ) -> None:
        self.reward = reward.freeze().to(device)
        self.token, self.max_request_bytes, self.device = token or None, max_request_bytes, device
        self.lock = threading.Lock()  # one batch at a time: reward models are rarely thread-safe
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def info(self) -> dict[str, Any]:
        r = self.reward
        return {
            "name": r.name,
            "request": dict(r.request),
            "reduction": r.reduction,
            "class": type(r).__name__,
        }

    def score(self, payload: Any) -> dict[str, Any]:
        """Score one decoded request: {"samples": ..., "cond": {...}} → {"scores", "info"}."""
        if (
            not isinstance(payload, dict)
            or "samples" not in payload
            or not isinstance(payload.get("cond"), dict)
        ):
            raise WireFormatError("expected a payload {'samples': ..., 'cond': {...}}")
        samples = _to(payload["samples"], self.device)
        entries = payload["cond"]
        n = _rows(entries)
        cond = as_cond(_to(entries, self.device), n)
        with self.lock, torch.no_grad():
            out = self.reward(samples, cond)
        if not isinstance(out, RewardOutput):  # Reward.__call__ wraps, but a subclass may not
            out = RewardOutput(torch.as_tensor(out), {})
        info = {k: v for k, v in out.info.items() if _sendable(v)}
        return {"scores": out.scores.detach(), "info": info}

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, notebooks); `shutdown()` + `server_close()` stop it."""
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        return thread


def _to(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def _rows(entries: dict[str, Any]) -> int:
    for v in entries.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v.shape[0]
        if isinstance(v, list):
            return len(v)
    raise WireFormatError("'cond' has no batch-first entry to count the rows by")


def _sendable(value: Any) -> bool:
    try:
        encode(value)
        return True
    except TypeError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per error only
        pass

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        if status >= 500 or status == 422:
            print(f"serve-reward: {status}: {message}", file=sys.stderr, flush=True)
        self._reply(status, json.dumps({"error": message}).encode())

    def _authorised(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
        self._error(401, "missing or wrong bearer token")
        return False

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path == "/health":
            return self._reply(200, b'{"ok": true}')
        if not self._authorised():
            return None
        if self.path == "/info":
            return self._reply(200, json.dumps(self.server.info()).encode())
        return self._error(404, f"no such endpoint: GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorised():
            return None
        if self.path != "/score":
            return self._error(404, f"no such endpoint: POST {self.path}")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._error(411, "a Content-Length header is required")
        if int(length) > self.server.max_request_bytes:
            self.close_connection = True  # the unread body must not be taken for the next request
            limit = self.server.max_request_bytes / 2**20
            return self._error(413, f"request of {int(length)} bytes exceeds the limit of {limit:g} MiB")
        body = self.rfile.read(int(length))
        try:
            payload = decode(body)
        except WireFormatError as e:
            return self._error(400, f"malformed request: {e}")
        try:
            result = self.server.score(payload)
        except WireFormatError as e:
            return self._error(400, f"malformed request: {e}")
        except Exception as e:  # noqa: BLE001 - the reward's own failure, reported to the client
            return self._error(422, f"{type(e).__name__}: {e}")
        try:
            body = encode(result)
        except TypeError as e:
            return self._error(500, f"the reward returned scores that cannot be sent: {e}")
        return self._reply(200, body, CONTENT_TYPE)


def build_parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="diffalign serve-reward", description=__doc__.splitlines()[0], exit_on_error=False
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with a `reward:` block")
    parser.add_subclass_arguments(Reward, "reward", required=True)
    parser.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--token",
        type=str | None,
        default=None,
        help=f"bearer token clients must send (default: ${TOKEN_ENV})",
    )
    parser.add_argument("--max_request_mb", type=float, default=64.0, help="larger requests get 413")
    parser.add_argument("--device", type=str, default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`diffalign serve-reward`; returns the exit status (serves until interrupted)."""
    from jsonargparse import ArgumentError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
        init = parser.instantiate_classes(cfg)
    except (ArgumentError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"diffalign serve-reward: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    token = cfg.token if cfg.token is not None else os.environ.get(TOKEN_ENV)
    try:
        server = RewardServer(
            init.reward, cfg.host, cfg.port, token, int(cfg.max_request_mb * 2**20), cfg.device
        )
    except OSError as e:
        print(f"diffalign serve-reward: cannot listen on {cfg.host}:{cfg.port}: {e}", file=sys.stderr)
        return 2
    auth = "a bearer token" if token else "no token"
    print(f"serving reward '{init.reward.name}' on {server.url} ({auth})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
