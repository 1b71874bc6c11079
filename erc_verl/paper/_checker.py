r"""The reward's helper process: math-verify checks, each in its own forked child killed at its deadline.

:mod:`erc_verl.paper.reward` runs this file by path (``python -I _checker.py``), so the helper imports
math-verify and nothing of erc_verl (whose ``__init__`` loads torch and verl). Protocol, JSON lines: the helper
says ``{"ready": true}``; each request ``{"id", "pred", "gold", "limit_s"}`` on stdin gets exactly one reply
``{"id", "score"}`` on stdout, ``score`` null when the check missed ``limit_s`` or its child died.

Why a fork per check, in here: a check must be killable (sympy spins for minutes and math-verify's own
``signal.alarm`` limits work only on a main thread), and forking this small, single-threaded process costs
~10 ms with math-verify already warm. Forking the caller instead is unsafe: its children share the epoll
instance of verl's event loop; with a child forked per check, the 32-thread test in tests/paper/test_reward.py
hung verl's loop (its epoll had lost the wake-up socket's registration, seen in /proc/<pid>/fdinfo).
``multiprocessing``'s forkserver and spawn re-import the caller's ``__main__`` in every child (a Ray worker's:
seconds); ``concurrent.futures`` cannot kill one task.
"""

import json
import os
import resource
import select
import signal
import sys
import time

#: Memory one check may add: sympy builds integers of gigabytes (``10^{10^{10}}``), and up to 32 run at once.
CHILD_MEMORY_HEADROOM_BYTES = 512 * 2**20


def _gold_latex(gold: str) -> str:
    if "\\boxed" in gold or "\\fbox" in gold:
        return gold
    while len(gold) >= 2 and gold.startswith("$") and gold.endswith("$"):
        gold = gold[1:-1].strip()
    return "\\boxed{" + gold + "}"


def _strip_punctuation(answer: str) -> str:
    """``540.`` -> ``540``: sentence punctuation math-verify would choke on."""
    answer = answer.strip()
    while answer and answer[-1] in ".,;:" and not answer.endswith("..."):
        answer = answer[:-1].rstrip()
    return answer


def verify_answer(pred: str, gold: str) -> float:
    """1.0 if math-verify finds ``pred`` equal to ``gold``. No time limit of its own: the helper kills it."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    pred, gold = _strip_punctuation(pred), _strip_punctuation(gold)
    configs = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
    gold_parsed = parse(_gold_latex(gold), configs, parsing_timeout=None) or parse(gold, configs, parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + pred + "}", configs, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0


def _reply(fd: int, message: dict) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())  # one write under PIPE_BUF: lines never interleave


def _run_child(fd: int, request: dict) -> None:
    """In the forked child: lowest priority (the helper must keep forking and killing while up to 32 children
    spin), CPU time capped (so it cannot outlive the helper), memory capped; check; reply; exit."""
    os.nice(19)
    cpu_s = max(1, int(request["limit_s"]) + 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (size + CHILD_MEMORY_HEADROOM_BYTES, resource.RLIM_INFINITY))
    except (OSError, ValueError):  # no /proc (not Linux): the CPU cap still holds
        pass
    try:
        score = verify_answer(str(request["pred"]), str(request["gold"]))
    except Exception:  # noqa: BLE001 - sympy raises anything on odd input (MemoryError, RecursionError, ...)
        score = 0.0
    _reply(fd, {"id": request["id"], "score": score})


def main() -> None:
    proto = os.dup(1)
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": the deadline is ours
    verify_answer("1", "1")  # import and warm math-verify once; every child inherits it
    _reply(proto, {"ready": True})
    children: dict[int, tuple[object, float]] = {}  # pid -> (request id, deadline)
    stdin = sys.stdin.buffer
    buffered = b""
    while True:
        now = time.monotonic()
        wait = min((deadline for _, deadline in children.values()), default=now + 1.0) - now
        if select.select([stdin], [], [], max(0.0, min(wait, 1.0)))[0]:
            chunk = os.read(stdin.fileno(), 1 << 20)
            if not chunk:  # the reward's process is gone
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
                return
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    try:
                        _run_child(proto, request)
                    finally:
                        os._exit(0)
                children[pid] = (request["id"], time.monotonic() + float(request["limit_s"]))
        now = time.monotonic()
        for pid, (request_id, deadline) in list(children.items()):
            if deadline <= now:
                os.kill(pid, signal.SIGKILL)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            request_id, _ = children.pop(pid)
            if os.waitstatus_to_exitcode(status) != 0:  # killed at its deadline or died: it did not reply
                _reply(proto, {"id": request_id, "score": None})


if __name__ == "__main__":
    main()
