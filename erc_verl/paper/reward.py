r"""Rule-based math reward: the last ``\boxed{...}`` of a response, checked with math-verify, in verl's format.

The paper (section 4.1) extracts the final answer from ``\boxed{}`` and judges it with math-verify.
:func:`compute_score` returns the dict verl's own math scorers return (``verl/utils/reward_score/math_dapo.py``):
``score`` (1.0 / 0.0), ``acc`` (the same), ``pred`` (the extracted answer, ``""`` when there is none) and
``timeout`` (1.0 when the check missed its time limit). verl's reward manager rewards ``score`` and passes every
key on as ``reward_extra_info``: validation then logs ``acc`` (mean@k, best@k), majority votes over ``pred``
(maj@k) and the timeout rate per data source, and the generation dumps carry them all.

Wiring it into verl 0.9.1::

    reward.custom_reward_function.path=pkg://erc_verl.paper.reward \
    reward.custom_reward_function.name=compute_score \
    +reward.custom_reward_function.reward_kwargs.timeout_s=5        # optional

Time limit
----------
Every call returns within ``timeout_s`` seconds of entry (the ``timeout_s`` keyword, else
``ERC_REWARD_TIMEOUT_S``, else :data:`DEFAULT_TIMEOUT_S`), whatever the thread, the input or the number of
concurrent calls: sympy can spin for minutes (``\binom{10^9}{10^8}``), and one such answer must not stall a
reward worker. math-verify's own limits use ``signal.alarm``, which works only on the main thread, and verl
calls the reward from threads (``loop.run_in_executor``). So every check runs in a helper process
(``_checker.py``, one per reward process, math-verify warm), which forks one child per check and kills it at the
call's deadline; the call itself stops waiting at the same deadline and scores 0 with ``timeout`` 1. A check
that dies, or a helper that dies, ends its calls at once with score 0 (and the next call restarts the helper).
There is no pool and no queue, so nothing to size: the children in flight are the calls in flight, which verl
bounds per reward worker by its event loop's default executor, ``min(32, os.cpu_count() + 4)`` threads
(measured: 32 threads of the worst answers at once, each call within the 5 s limit, a right answer among them
scored right). Why this hand-made helper and not a library (``concurrent.futures`` cannot kill one task;
``multiprocessing``'s forkserver and spawn re-import the caller's ``__main__`` per child; forking the caller
breaks verl's event loop): see ``_checker.py``.

The helper starts with the first call of a process (~1 s; calls wait for it within their own limit). If it
exits or is not ready within :data:`START_TIMEOUT_S`, that call and every later one raise
:class:`RewardHelperError`: no answer is ever checked without a limit.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds from entry to return of one call.
DEFAULT_TIMEOUT_S = 5.0
#: Seconds a new helper process may take to be ready (import and warm math-verify) before the reward gives up.
START_TIMEOUT_S = 60.0
#: Kept back from the limit for returning in time when up to 32 calls reach their deadline at the same moment.
KILL_MARGIN_S = 0.5
#: Longest boxed answer that is handed to math-verify; longer ones score 0.0 (no real answer is this long).
MAX_ANSWER_CHARS = 1000
#: Longest ground truth that is handed to math-verify.
MAX_GROUND_TRUTH_CHARS = 1000
#: How many ``\boxed`` candidates (from the end) are inspected before giving up.
MAX_BOX_CANDIDATES = 64

_BOX_MARKERS = ("\\boxed", "\\fbox")


class RewardHelperError(RuntimeError):
    """The helper processes cannot run math-verify, so no answer could be checked within a limit."""


# --------------------------------------------------------------------------- text


@cache
def _invisible_chars() -> dict[int, None]:
    """Control (Cc, but tab and newlines) and format (Cf: NUL, RLM, zero-width, BOM...) characters."""
    return {
        cp: None
        for cp in range(sys.maxunicode + 1)
        if unicodedata.category(chr(cp)) in ("Cc", "Cf") and chr(cp) not in "\t\n\r"
    }


def normalize_text(text: str) -> str:
    """NFKC (fullwidth ``４２`` -> ``42``), then drop control and format characters that would break parsing."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return text.translate(_invisible_chars())


def _scan_braced(text: str, open_pos: int) -> str | None:
    """Content of the brace group opening at ``open_pos``; None if unbalanced or too long.

    Escaped braces (``\\{``, ``\\}``) do not count, so ``\\boxed{\\{1,2\\}}`` and
    ``\\boxed{\\left\\{ x \\right.}`` both work.
    """
    depth = 0
    i = open_pos
    limit = min(len(text), open_pos + MAX_ANSWER_CHARS + 2)
    while i < limit:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
        i += 1
    return None


def extract_last_boxed(text: Any) -> str | None:
    r"""Content of the last ``\boxed{...}`` / ``\fbox{...}`` / ``\boxed X`` in ``text``.

    Returns None when there is no box, or when the last box is unbalanced (a truncated response does
    not get credit for an earlier draft answer) or longer than :data:`MAX_ANSWER_CHARS`.
    """
    if not isinstance(text, str) or not text:
        return None
    end = len(text)
    for _ in range(MAX_BOX_CANDIDATES):
        pos, marker = max((text.rfind(m, 0, end), m) for m in _BOX_MARKERS)
        if pos < 0:
            return None
        after = pos + len(marker)
        j = after
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            content = _scan_braced(text, j)
            return content.strip() if content is not None else None
        if j > after and j < len(text) and text[j] not in "\n$":
            # "\boxed 5" form: the answer is the next whitespace- or "$"-delimited token.
            m = re.match(rf"[^\s$]{{1,{MAX_ANSWER_CHARS}}}", text[j:])
            return m.group(0) if m else None
        end = pos  # e.g. "\boxedfoo" or a bare "\boxed" at the end: look further back
    return None


def _ground_truth_str(ground_truth: Any) -> str | None:
    if isinstance(ground_truth, bytes):
        ground_truth = ground_truth.decode("utf-8", "replace")
    if isinstance(ground_truth, bool) or ground_truth is None:
        return None
    if isinstance(ground_truth, float) and ground_truth.is_integer():
        ground_truth = int(ground_truth)
    if isinstance(ground_truth, (int, float)):
        return str(ground_truth)
    if isinstance(ground_truth, (list, tuple)) and ground_truth:
        return _ground_truth_str(ground_truth[0])
    if hasattr(ground_truth, "tolist") and not isinstance(ground_truth, str):  # numpy values
        return _ground_truth_str(ground_truth.tolist())
    return ground_truth if isinstance(ground_truth, str) else None


# --------------------------------------------------------------------------- the helper process


def _helper_argv() -> list[str]:
    # -I: no user site, no PYTHON* variables, no script directory on sys.path (nothing of erc_verl is imported)
    return [sys.executable, "-I", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_checker.py")]


class _Helper:
    """One helper process (``_checker.py``) and the calls waiting on it, matched by request id."""

    def __init__(self) -> None:
        # its own process group: when it dies, its checks (which hold its stdout) are killed with it
        self.proc = subprocess.Popen(
            _helper_argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True
        )
        self.start_deadline = time.monotonic() + START_TIMEOUT_S
        self.ready = Future()
        self.pending: dict[int, Future] = {}
        self.ids = itertools.count()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, name="erc-reward-helper-reader", daemon=True).start()
        threading.Thread(target=self._watch, name="erc-reward-helper-watch", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                if message.get("ready") is True and not self.ready.done():
                    self.ready.set_result(True)
                future = self.pending.pop(message.get("id"), None)
            if future is not None:
                future.set_result(message.get("score"))

    def _watch(self) -> None:
        """When the helper exits, everyone waiting on it gets "no verdict" at once."""
        code = self.proc.wait()
        self.close()
        with self.lock:
            dead, self.pending = self.pending, {}
            if not self.ready.done():
                self.ready.set_result(False)
        for future in dead.values():
            future.set_result(None)
        if dead or code != -signal.SIGKILL:
            logger.warning("erc_verl.paper.reward: the math-verify helper process exited (code %s)", code)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self, pred: str, gold: str, deadline: float) -> float | None:
        """The verdict, or None when there is none by ``deadline`` (the helper kills the check then too)."""
        future: Future = Future()
        with self.lock:
            request_id = next(self.ids)
            self.pending[request_id] = future
            request = {"id": request_id, "pred": pred, "gold": gold, "limit_s": max(0.0, deadline - time.monotonic())}
            try:
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
            except OSError:  # the helper is gone; its reader resolves the futures
                self.pending.pop(request_id, None)
                return None
        try:
            verdict = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            with self.lock:
                self.pending.pop(request_id, None)
            return None
        return None if verdict is None else float(verdict)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


_helper: _Helper | None = None
_helper_pid: int | None = None  # the process that started it: a fork must start its own
_start_error: RewardHelperError | None = None
_helper_lock = threading.Lock()


def _get_helper(deadline: float) -> _Helper | None:
    """The running helper (started, or restarted after it died, here), or None if it is not ready by ``deadline``.

    A helper that is not ready within :data:`START_TIMEOUT_S` of its start, or exits first, raises
    :class:`RewardHelperError`, in this call and every later one of this process.
    """
    global _helper, _helper_pid, _start_error
    with _helper_lock:
        if _start_error is not None and _helper_pid == os.getpid():
            raise _start_error
        helper = _helper
        if helper is None or _helper_pid != os.getpid() or (helper.ready.done() and not helper.alive()):
            helper, _helper_pid, _start_error = _Helper(), os.getpid(), None
            _helper = helper
            atexit.register(helper.close)
    try:
        if helper.ready.result(timeout=max(0.0, min(deadline, helper.start_deadline) - time.monotonic())):
            return helper
        what = f"exited with code {helper.proc.wait()} before it was ready"
    except FutureTimeout:
        if time.monotonic() < helper.start_deadline:
            return None  # still starting: this call's limit comes first
        helper.close()
        what = f"was not ready within {START_TIMEOUT_S:g} s"
    with _helper_lock:
        _start_error = RewardHelperError(
            f"erc_verl.paper.reward: the math-verify helper process ({' '.join(_helper_argv())}) {what}; install "
            f"math-verify in this Python environment (pip install math-verify) and run that command to see the error"
        )
        raise _start_error


def _timeout_s(value: Any) -> float:
    raw = os.environ.get("ERC_REWARD_TIMEOUT_S", DEFAULT_TIMEOUT_S) if value is None else value
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = math.nan
    if not seconds > KILL_MARGIN_S or math.isinf(seconds):
        source = "timeout_s" if value is not None else "ERC_REWARD_TIMEOUT_S"
        raise ValueError(f"{source}={raw!r} is not a time limit; give seconds above {KILL_MARGIN_S}, e.g. 5")
    return seconds


# --------------------------------------------------------------------------- public API


def _result(score: float, pred: str, timeout: bool = False) -> dict[str, Any]:
    return {"score": score, "acc": score, "pred": pred, "timeout": 1.0 if timeout else 0.0}


def compute_score(
    data_source: Any = None,
    solution_str: Any = None,
    ground_truth: Any = None,
    extra_info: Any = None,
    timeout_s: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    r"""verl custom reward: score 1.0 if the last ``\boxed{}`` in ``solution_str`` matches ``ground_truth``.

    ``data_source``, ``extra_info`` and other keyword arguments (verl's reward-router ones) are accepted and
    ignored: the check is the same for every math data source. Missing, malformed or unboxed answers score 0;
    so does a check that misses ``timeout_s``. Raises only on a bad ``timeout_s`` and when the helper
    processes cannot start (:class:`RewardHelperError`).
    """
    deadline = time.monotonic() + _timeout_s(timeout_s) - KILL_MARGIN_S
    answer = extract_last_boxed(normalize_text(solution_str)) if isinstance(solution_str, str) else None
    gold = _ground_truth_str(ground_truth)
    gold = normalize_text(gold).strip() if gold is not None else ""
    if not answer or not gold or len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_GROUND_TRUTH_CHARS:
        return _result(0.0, answer or "")
    helper = _get_helper(deadline)
    verdict = helper.check(answer, gold, deadline) if helper is not None else None
    return _result(verdict or 0.0, answer, timeout=verdict is None and time.monotonic() >= deadline)
