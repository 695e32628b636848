"""Scoring for the generation benchmarks: GSM8K answer matching and an MBPP execution sandbox.

GSM8K: a completion is correct when its final number (after the last `####`, else the last
number in the text) equals the reference number after `####`, compared in canonical form
("$1,234.50" -> "1234.5", "18.0" -> "18").

MBPP: `run_mbpp` runs solution, then setup and asserts, in a kernel sandbox that the program
can neither escape nor fool into reporting a pass (harness/sandbox.py says how, and what
assert-based tests cannot rule out).
Side effects happen only when the functions are called; importing this module is free.
"""
import re
from decimal import Decimal

from harness.sandbox import (  # re-exported, so callers of MBPP scoring need only this module
    SandboxResult, SandboxUnavailable, check_isolation, run_sandboxed)

# --- GSM8K: final-number extraction -------------------------------------------------------

# Optional sign (only when not glued to a word, so "10-3" is 3), optional "$", then either
# a comma-grouped number, a plain number, or ".5". A trailing "." is never part of it.
_NUMBER = re.compile(r"(?:(?<![\w.])(-))?\$?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def _canonical(match: re.Match) -> str:
    """'-', '1,234.50' -> '-1234.5': no commas, no trailing zeros, no '.0', no '-0'."""
    value = Decimal((match.group(1) or "") + match.group(2).replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The first number after the last '####', else the last number anywhere; None if none."""
    _, sep, tail = text.rpartition("####")
    if sep and (match := _NUMBER.search(tail)):
        return _canonical(match)
    matches = list(_NUMBER.finditer(text))
    return _canonical(matches[-1]) if matches else None


def gsm8k_reference(answer_field: str) -> str:
    """The canonical number after '####' in a GSM8K reference answer."""
    _, sep, tail = answer_field.rpartition("####")
    match = _NUMBER.search(tail) if sep else None
    if match is None:
        raise ValueError(f"no '#### <number>' in reference answer {answer_field[-80:]!r}")
    return _canonical(match)


def gsm8k_correct(generated: str, reference_answer_field: str) -> bool:
    """Whether the completion's final number equals the reference number."""
    return extract_gsm8k_answer(generated) == gsm8k_reference(reference_answer_field)


# --- MBPP: code extraction ----------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
# Top-level lines after which a completion is no longer the solution: closing fences, end
# markers, demo code (asserts and prints may be wrong and would fail the sample), tests.
_CODE_END = re.compile(r"^(```|\[DONE\]|</s>|<\|endoftext\|>|<\|im_end\|>|if __name__|assert\b"
                       r"|print\(|# ?[Tt]ests?\b)")


def extract_code(generated: str) -> str:
    """The solution in a completion: its first ```python block, else the text up to an end line."""
    blocks = _FENCE.findall(generated)
    python = [body for lang, body in blocks if lang.lower() in ("python", "python3", "py")]
    plain = [body for lang, body in blocks if not lang]
    text = (python or plain or [generated.replace("[BEGIN]", "", 1)])[0]
    lines = []
    for line in text.splitlines():
        if _CODE_END.match(line):
            break
        lines.append(line)
    return "\n".join(lines).strip("\n") + "\n"


# --- MBPP: sandboxed execution ------------------------------------------------------------

def run_mbpp(code: str, test_list: list[str], test_setup_code: str = "", *,
             timeout_s: float = 10.0, memory_mb: int = 1024,
             allow_unisolated: bool = False) -> SandboxResult:
    """Run an MBPP solution, then its setup and asserts, in the sandbox (harness/sandbox.py).

    Raises SandboxUnavailable where no kernel sandbox works, unless allow_unisolated=True.
    """
    # The setup goes after the code: MBPP's setups build objects from classes the code defines.
    tests = "\n".join([test_setup_code, *test_list]) + "\n"
    return run_sandboxed(code, tests, timeout_s=timeout_s, memory_mb=memory_mb,
                         allow_unisolated=allow_unisolated)
