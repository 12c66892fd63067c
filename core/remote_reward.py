"""Rewards computed in another process: the `RemoteReward` client and the wire format it shares with
`diffalign serve-reward` (`core.serve_reward`).

Heavy reward models (VLM judges, OCR, detectors) often need dependencies that conflict with the
trainer's, or a GPU of their own; the anchors run them as servers (Flow-GRPO's reward server,
ddpo-pytorch's LLaVA server). `RemoteReward` is a `Reward` like any other: the core decodes the samples
as the served reward asks (`GET /info` gives its name, decode request and reduction) and the client sends
them with the batch's conditions to `POST /score`, `batch_size` rows per request, and returns the
server's scores and info.

Wire format (both directions, no pickle): `DAW1`, the length of a JSON header as 8 little-endian bytes,
the header, then the arrays as `.npy` blobs. The header's `tree` is the payload with every array
replaced by `{"$array": i}`; `arrays` lists each blob's (offset, length). Arrays are read back with
`allow_pickle=False`, so only plain numeric/bool arrays, strings, numbers, lists and string-keyed dicts
travel.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffalign.core.reward import Reward, RewardError, RewardOutput, RewardUnavailableError, SampleView
from diffalign.core.types import Cond

MAGIC = b"DAW1"
CONTENT_TYPE = "application/x-diffalign"
TOKEN_ENV = "DIFFALIGN_REWARD_TOKEN"
#: HTTP statuses worth retrying (the server is restarting, overloaded or behind a proxy that is)
RETRY_STATUS = {502, 503, 504}


class WireFormatError(ValueError):
    """A body that is not in the wire format (the message says where it breaks)."""


# -- wire format -------------------------------------------------------------------------------------
def _array(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    return np.ascontiguousarray(value)


def encode(payload: Any) -> bytes:
    """`payload` (tensors, numpy arrays, str, numbers, None, lists, string-keyed dicts) as a body."""
    blobs: list[bytes] = []

    def walk(value: Any) -> Any:
        if isinstance(value, (Tensor, np.ndarray)):
            buf = io.BytesIO()
            array = _array(value)
            if array.dtype == object:
                raise TypeError("object arrays cannot be sent (no pickle): use numbers, strings or lists")
            np.lib.format.write_array(buf, array, allow_pickle=False)
            blobs.append(buf.getvalue())
            return {"$array": len(blobs) - 1}
        if isinstance(value, Mapping):
            if "$array" in value:
                raise TypeError("dict keys may not be '$array' (the wire format's array marker)")
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(f"dict keys must be strings to be sent, got {type(k).__name__} {k!r}")
                out[k] = walk(v)
            return out
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return value.item()
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise TypeError(f"cannot send a {type(value).__name__} (tensors, arrays, str, numbers, lists, dicts)")

    tree = walk(payload)
    offsets, position = [], 0
    for blob in blobs:
        offsets.append([position, len(blob)])
        position += len(blob)
    header = json.dumps({"tree": tree, "arrays": offsets}, allow_nan=True).encode("utf-8")
    return b"".join([MAGIC, struct.pack("<Q", len(header)), header, *blobs])


def decode(body: bytes, as_tensors: bool = True) -> Any:
    """A body back to its payload (arrays as torch tensors, or numpy arrays with `as_tensors=False`).

    Raises `WireFormatError` on anything malformed."""
    if len(body) < 12 or body[:4] != MAGIC:
        raise WireFormatError(f"not a diffalign body (expected it to start with {MAGIC!r})")
    (size,) = struct.unpack("<Q", body[4:12])
    if size > len(body) - 12:
        raise WireFormatError(f"header length {size} exceeds the body ({len(body)} bytes)")
    try:
        header = json.loads(body[12 : 12 + size].decode("utf-8"))
        tree, offsets = header["tree"], header["arrays"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise WireFormatError(f"unreadable header: {e}") from None
    data = memoryview(body)[12 + size :]
    arrays: list[Any] = []
    for i, entry in enumerate(offsets):
        try:
            start, length = int(entry[0]), int(entry[1])
        except (TypeError, ValueError, IndexError):
            raise WireFormatError(f"array {i}: bad (offset, length) {entry!r}") from None
        if start < 0 or length < 0 or start + length > len(data):
            raise WireFormatError(f"array {i} lies outside the body")
        try:
            array = np.lib.format.read_array(io.BytesIO(data[start : start + length]), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - numpy raises many kinds on a bad blob
            raise WireFormatError(f"array {i} is not a plain .npy array: {e}") from None
        arrays.append(torch.from_numpy(array.copy()) if as_tensors else array)

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"$array"}:
                index = value["$array"]
                if not isinstance(index, int) or not 0 <= index < len(arrays):
                    raise WireFormatError(f"reference to array {index!r} of {len(arrays)}")
                return arrays[index]
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(tree)


def cond_payload(cond: Cond) -> dict[str, Any]:
    """A batch's conditions as a plain dict of entries (tensors and per-sample metadata lists)."""
    return {str(k): cond[k] for k in cond}


def take_rows(samples: Any, rows: slice) -> Any:
    """Rows `rows` of a batch of samples in any layout (a tensor, a dict of them, a list of ragged ones)."""
    if isinstance(samples, (Tensor, np.ndarray, list, tuple)):
        return samples[rows]
    if isinstance(samples, Mapping):
        return {k: take_rows(v, rows) for k, v in samples.items()}
    return samples


def _cat(parts: Sequence[Any]) -> Any:
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat([torch.as_tensor(p) for p in parts]) if first.dim() > 0 else first
    if isinstance(first, list):
        return [x for p in parts for x in p]
    return first


# -- the client ----------------------------------------------------------------------------------------
class RemoteReward(Reward):
    """A reward computed by a `diffalign serve-reward` server, over HTTP.

    Args:
        url: the server, e.g. "http://127.0.0.1:8765".
        token: bearer token the server requires (default: the DIFFALIGN_REWARD_TOKEN environment variable;
            keep tokens out of recipes).
        batch_size: rows per request (bounds each request's size).
        timeout: seconds to wait for one response.
        retries: further attempts when the server cannot be reached, times out or answers 502/503/504
            (e.g. while it restarts), waiting `backoff`·2^attempt seconds before each.
        backoff: the first wait, in seconds.
        max_workers: requests in flight at once (a batch split over several server workers).
        name: the reward's name (default: the served reward's).

    The server's reward decides what is decoded (`request`) and how per-element scores reduce
    (`reduction`); both come from `GET /info` at first use. A server that stays unreachable raises
    `RewardUnavailableError` naming the URL (never counted as invalid samples); a reward that fails on
    the server raises `RewardError` with its message, which `GuardedReward` handles like any reward's.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        batch_size: int = 64,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_workers: int = 1,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"RemoteReward url must start with http:// or https://, got {url!r}")
        if batch_size < 1 or retries < 0 or timeout <= 0 or max_workers < 1:
            raise ValueError("need batch_size >= 1, retries >= 0, timeout > 0 and max_workers >= 1")
        self.url = url.rstrip("/")
        self._token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.batch_size, self.timeout, self.retries, self.backoff = batch_size, timeout, retries, backoff
        self.max_workers = max_workers
        self._info: dict[str, Any] | None = None

    # -- HTTP --------------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: bytes | None = None) -> bytes:
        headers = {"Content-Type": CONTENT_TYPE} if body is not None else {}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code not in RETRY_STATUS:
                    raise _http_error(self.url + path, e.code, detail) from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                last = str(getattr(e, "reason", e))
        raise RewardUnavailableError(
            f"reward server {self.url} is unreachable after {self.retries + 1} attempts ({last}); "
            "is `diffalign serve-reward` running there?"
        )

    def info(self) -> dict[str, Any]:
        """The served reward's name, decode request and reduction (`GET /info`, fetched once)."""
        if self._info is None:
            info = json.loads(self._call("GET", "/info"))
            self._info = info
            self.request = dict(info.get("request") or {})
            self.reduction = info.get("reduction")
            if self._name is None:
                self._name = info.get("name")
        return self._info

    # -- the Reward interface ----------------------------------------------------------------------------
    def evaluate(self, view: SampleView, cond: Cond) -> RewardOutput:
        self.info()  # the served reward's request decides what is decoded
        return super().evaluate(view, cond)

    def forward(self, samples: Any, cond: Cond) -> RewardOutput:
        self.info()
        n = len(cond)
        bs = self.batch_size
        chunks = [slice(s, min(s + bs, n)) for s in range(0, n, bs)] or [slice(0, 0)]

        def score(rows: slice) -> dict[str, Any]:
            body = encode({"samples": take_rows(samples, rows), "cond": cond_payload(cond[rows])})
            return decode(self._call("POST", "/score", body))

        if self.max_workers > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(self.max_workers) as pool:
                parts = list(pool.map(score, chunks))
        else:
            parts = [score(rows) for rows in chunks]
        scores = _cat([torch.as_tensor(p["scores"]) for p in parts])
        keys = parts[0].get("info", {}).keys()
        info = {k: _cat([p["info"][k] for p in parts]) for k in keys}
        return RewardOutput(scores, info)


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read()).get("error", "")) or error.reason
    except Exception:  # noqa: BLE001 - the body may be anything
        return str(error.reason)


def _http_error(url: str, status: int, detail: str) -> Exception:
    if status == 422:  # the reward itself failed on these samples
        return RewardError(f"the reward served at {url} failed: {detail}")
    hint = {401: " (check the token: DIFFALIGN_REWARD_TOKEN)", 413: " (lower batch_size)"}.get(status, "")
    return RewardUnavailableError(f"reward server {url} refused the request: HTTP {status}: {detail}{hint}")
