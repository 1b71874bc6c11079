r"""Rule-based math reward: the last ``\boxed{...}`` of a response, checked with math-verify.

The paper (section 4.1) extracts the final answer from ``\boxed{}`` and judges it with math-verify;
this module does exactly that and returns 1.0 or 0.0. It never raises and never hangs, because one
pathological response must not stall or crash a training step.

Wiring it into verl 0.9.1
-------------------------
verl 0.9.1 computes rewards in the reward loop (``verl/experimental/reward_loop``). The config keys
are ``reward.custom_reward_function.path`` and ``reward.custom_reward_function.name`` (the legacy
top-level ``custom_reward_function.path/name`` are copied there by ``migrate_legacy_reward_impl``).
``path`` goes through ``verl.utils.import_utils.load_module``, which accepts ``pkg://dotted.module``,
so no absolute path is needed once this package is importable on every node::

    reward.custom_reward_function.path=pkg://erc_verl.paper.reward \
    reward.custom_reward_function.name=compute_score

Extra keyword arguments can be added with
``+reward.custom_reward_function.reward_kwargs.<key>=<value>``; they are merged into every call.

How verl calls it: ``NaiveRewardManager.run_single`` calls
``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`` (plus
``reward_router_address``/``reward_model_tokenizer`` only when a reward model router is used)
through ``loop.run_in_executor(None, ...)`` -- i.e. always on a worker *thread*. A float result is
logged as ``acc``; a dict must carry ``score``.

Timeouts
--------
math-verify bounds its own run time with ``signal.alarm``, which only works on the main thread, and
sympy can spin for minutes on inputs such as ``9^{9^{9}}``. So:

* on the main thread, math-verify runs inline with its signal timeouts;
* on any other thread, the check runs in a small pool of helper processes (this file executed as a
  script, speaking JSON lines), where the signal timeouts work; a helper that misses the hard
  deadline is killed and the answer scores 0.0.

``ERC_REWARD_ISOLATION`` = ``auto`` (default, as above) | ``subprocess`` (always use helpers) |
``inline`` (never; off the main thread this disables timeouts and relies on the input caps only).
``ERC_REWARD_TIMEOUT_S`` (default 3) bounds each math-verify parse/verify step,
``ERC_REWARD_WORKERS`` (default 2) caps helper processes per Python process.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

#: Longest boxed answer that is handed to math-verify; longer ones score 0.0 (no real answer is this long).
MAX_ANSWER_CHARS = 1000
#: Longest ground truth that is handed to math-verify.
MAX_GROUND_TRUTH_CHARS = 1000
#: How many ``\boxed`` candidates (from the end) are inspected before giving up.
MAX_BOX_CANDIDATES = 64

_BOX_MARKERS = ("\\boxed", "\\fbox")
_WORKER_RUN_NAME = "__erc_reward_worker__"


# --------------------------------------------------------------------------- extraction


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


# --------------------------------------------------------------------------- math-verify


def _timeout_s() -> int:
    try:
        return max(1, int(float(os.environ.get("ERC_REWARD_TIMEOUT_S", "3"))))
    except ValueError:
        return 3


def _clean(answer: str) -> str:
    """Drop sentence punctuation math-verify would choke on: ``540.`` -> ``540``."""
    answer = answer.strip()
    while answer and answer[-1] in ".,;:" and not answer.endswith("..."):
        answer = answer[:-1].rstrip()
    return answer


def _gold_latex(ground_truth: str) -> str:
    gt = ground_truth.strip()
    if "\\boxed" in gt or "\\fbox" in gt:
        return gt
    while len(gt) >= 2 and gt.startswith("$") and gt.endswith("$"):
        gt = gt[1:-1].strip()
    return "\\boxed{" + gt + "}"


def _verify_inline(pred: str, gold: str, timeout_s: int | None) -> float:
    """math-verify on an extracted answer. ``timeout_s=None`` disables the signal timeouts."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    pred, gold = _clean(pred), _clean(gold)
    configs = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    gold_parsed = parse(_gold_latex(gold), configs, parsing_timeout=timeout_s)
    if not gold_parsed:
        gold_parsed = parse(gold, configs, parsing_timeout=timeout_s)
    pred_parsed = parse("\\boxed{" + pred + "}", configs, parsing_timeout=timeout_s)
    if not gold_parsed or not pred_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s) else 0.0


_EXPLOSIVE = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\{?\s*\d{4,}|\d{3,}\s*!|!\s*!")


def _looks_explosive(expr: str) -> bool:
    """Cheap guard for the no-timeout path: towers, huge exponents and factorials stall sympy."""
    return bool(_EXPLOSIVE.search(expr))


# --------------------------------------------------------------------------- helper processes


class _Worker:
    """One helper process answering JSON-line requests; killed when it misses a deadline."""

    def __init__(self, argv: list[str], start_timeout_s: float):
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
            close_fds=True,
        )
        self._buf = b""
        hello = None
        try:
            hello = self._read_line(time.monotonic() + start_timeout_s)
            msg = json.loads(hello) if hello is not None else None
        except (ValueError, OSError):
            msg = None
        if not isinstance(msg, dict) or msg.get("ready") is not True:
            self.kill()
            raise RuntimeError(f"reward helper did not start: {hello!r}")

    def _wait_readable(self, fd: int, timeout_s: float) -> bool:
        # poll(), not select(): Ray workers hold many sockets and select() fails for fds >= 1024.
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            return bool(poller.poll(max(0, int(timeout_s * 1000))))
        return bool(select.select([fd], [], [], timeout_s)[0])

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not self._wait_readable(fd, remaining):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # helper died
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def request(self, payload: dict, deadline_s: float) -> float | None:
        """The helper's score, or None when it failed or missed the deadline (then it is dead)."""
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
            self.proc.stdin.flush()
            line = self._read_line(time.monotonic() + deadline_s)
            if line is None:
                self.kill()
                return None
            return float(json.loads(line)["score"])
        except Exception:
            self.kill()
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except Exception:
                pass


class _WorkerPool:
    """At most ``size`` helpers, started lazily and shared by all threads of this process."""

    def __init__(self, argv: list[str], size: int, start_timeout_s: float = 60.0):
        self.argv = argv
        self.size = max(1, size)
        self.start_timeout_s = start_timeout_s
        self._idle: list[_Worker] = []
        self._count = 0
        self._cond = threading.Condition()
        self._pid = os.getpid()

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                while self._idle:
                    w = self._idle.pop()
                    if w.alive():
                        return w
                    self._count -= 1
                if self._count < self.size:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return _Worker(self.argv, self.start_timeout_s)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _release(self, w: _Worker) -> None:
        with self._cond:
            if w.alive():
                self._idle.append(w)
            else:
                self._count -= 1
            self._cond.notify()

    def run(self, payload: dict, deadline_s: float) -> float | None:
        w = self._acquire()
        try:
            return w.request(payload, deadline_s)
        finally:
            self._release(w)

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for w in idle:
            w.kill()


def _worker_argv() -> list[str]:
    # Run this very file (no package import, so no torch/verl) with the caller's interpreter. The
    # bootstrap drops "" from sys.path so files in the caller's cwd cannot shadow stdlib modules.
    boot = (
        "import sys, runpy; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
        f"runpy.run_path({os.path.abspath(__file__)!r}, run_name={_WORKER_RUN_NAME!r})"
    )
    return [sys.executable, "-c", boot]


_pool: _WorkerPool | None = None
_pool_lock = threading.Lock()
_pool_start_failures = 0
#: After this many helper start failures in a row, verify inline (unbounded) instead.
MAX_POOL_START_FAILURES = 3
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def _get_pool() -> _WorkerPool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._pid != os.getpid():  # a fork must not reuse the parent's pipes
            try:
                size = int(os.environ.get("ERC_REWARD_WORKERS", "2"))
            except ValueError:
                size = 2
            _pool = _WorkerPool(_worker_argv(), size)
            atexit.register(_pool.close)
        return _pool


def _verify_isolated(pred: str, gold: str, timeout_s: int) -> float:
    global _pool_start_failures
    if _pool_start_failures < MAX_POOL_START_FAILURES:
        # Two parses and a few comparisons, each bounded by timeout_s inside the helper, plus slack.
        deadline = 4 * timeout_s + 5.0
        try:
            score = _get_pool().run({"pred": pred, "gold": gold, "timeout": timeout_s}, deadline)
        except Exception as e:  # could not start a helper
            _pool_start_failures += 1
            _warn_once("pool", f"erc_verl.paper.reward: reward helper process failed to start ({e}).")
        else:
            _pool_start_failures = 0
            return 0.0 if score is None else score
    return _verify_unbounded(pred, gold)


def _verify_unbounded(pred: str, gold: str) -> float:
    _warn_once("unbounded", "erc_verl.paper.reward: math-verify runs without timeouts off the main thread.")
    if _looks_explosive(pred):
        return 0.0
    return _verify_inline(pred, gold, None)


def _worker_main() -> None:
    """Helper loop: one JSON request per stdin line, one JSON reply per line on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        import math_verify  # noqa: F401
    except Exception as e:
        proto.write(json.dumps({"ready": False, "error": repr(e)}) + "\n")
        return
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            req = json.loads(line)
            score = _verify_inline(str(req["pred"]), str(req["gold"]), int(req["timeout"]))
        except BaseException:
            score = 0.0
        proto.write(json.dumps({"score": score}) + "\n")


# --------------------------------------------------------------------------- public API


def _isolation_mode() -> str:
    mode = os.environ.get("ERC_REWARD_ISOLATION", "auto").strip().lower()
    return mode if mode in ("auto", "subprocess", "inline") else "auto"


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


def score_answer(answer: str, ground_truth: Any) -> float:
    """1.0 if an already-extracted answer equals ``ground_truth`` per math-verify, else 0.0."""
    try:
        gold = _ground_truth_str(ground_truth)
        if not answer or not gold or not gold.strip():
            return 0.0
        if len(answer) > MAX_ANSWER_CHARS or len(gold) > MAX_GROUND_TRUTH_CHARS:
            return 0.0
        timeout_s = _timeout_s()
        mode = _isolation_mode()
        on_main = threading.current_thread() is threading.main_thread()
        if mode == "subprocess" or (mode == "auto" and not on_main):
            return _verify_isolated(answer, gold, timeout_s)
        if on_main:
            return _verify_inline(answer, gold, timeout_s)
        return _verify_unbounded(answer, gold)
    except KeyboardInterrupt:
        raise
    except BaseException:  # math-verify's TimeoutException, sympy recursion errors, ...
        logger.debug("erc_verl.paper.reward: scoring failed", exc_info=True)
        return 0.0


def compute_score(
    data_source: Any = None,
    solution_str: Any = None,
    ground_truth: Any = None,
    extra_info: Any = None,
    **kwargs: Any,
) -> float:
    r"""verl custom reward: 1.0 if the last ``\boxed{}`` in ``solution_str`` matches ``ground_truth``.

    ``data_source``, ``extra_info`` and any extra kwargs are accepted and ignored: the check is the
    same for every math data source. Never raises; returns 0.0 for missing, malformed or unboxed
    answers and for checks that time out.
    """
    try:
        answer = extract_last_boxed(solution_str)
        if answer is None:
            return 0.0
        return score_answer(answer, ground_truth)
    except KeyboardInterrupt:
        raise
    except BaseException:
        logger.debug("erc_verl.paper.reward: compute_score failed", exc_info=True)
        return 0.0


if __name__ == _WORKER_RUN_NAME:
    _worker_main()
