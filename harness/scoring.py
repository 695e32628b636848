"""Scoring for the generation benchmarks: GSM8K answer matching and an MBPP execution sandbox.

GSM8K: a completion is correct when its final number (after the last `####`, else the last
number in the text) equals the reference number after `####`, compared in canonical form
("$1,234.50" -> "1234.5", "18.0" -> "18").

MBPP: `run_mbpp` runs a solution in a kernel sandbox it cannot escape (harness/sandbox.py) and,
for asserts whose calls have literal arguments, decides the verdict outside it from the values
the solution's functions returned; other problems are judged in the sandbox (see below).
Side effects happen only when the functions are called; importing this module is free.
"""
import ast
import builtins
import dataclasses
import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal

from harness.sandbox import (  # re-exported, so callers of MBPP scoring need only this module
    SandboxResult, SandboxUnavailable, check_isolation, run_calls, run_sandboxed)

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


# --- MBPP: the verdict, decided outside the sandbox --------------------------------------------
#
# MBPP's asserts come from the dataset and are trusted; only the solution is not. Code inside
# the sandbox can read and write its own process's memory (through any route to raw memory
# the audit hook does not know of: an extension module loaded under a dotted name, say), so a
# verdict decided in there can be forged. So where an assert allows it, the verdict is decided
# here: each call of the solution's function in the assert must have literal arguments; the
# sandbox only makes those calls (arguments crossing as Python literals) and sends back repr of
# each return value; here it is read back with ast.literal_eval (as plain data: ints, strings,
# lists, ..., at most RESULT_LIMIT bytes in all) and the assert is evaluated by this process
# with each call replaced by its value, with real builtins and `math`. The program never sees
# an assert or an expected value, and no value it returns can carry code or an __eq__ of its
# own, so the only way to pass is to return the right values. A return value whose repr is
# not a literal (a generator, an instance of the solution's class, float('nan')) fails.
#
# Asserts that cannot be split so (arguments that are variables or expressions, a setup code,
# the solution's names used other than as a direct call, or a name that is not a builtin) take
# the in-sandbox path: the whole problem runs as before, with the guarantees and the limits
# harness/sandbox.py states. Which path a problem takes is decided from its asserts alone
# (trusted data), never from the solution; mbpp_verdict_path says which, and the result's
# `verdict` field records it, so a report can count the problems judged in the sandbox.

# The names a trusted assert may use besides the solution's functions.
_TRUSTED_NAMES = {name: getattr(builtins, name) for name in (
    "abs", "all", "any", "bool", "dict", "float", "frozenset", "int", "isinstance", "len",
    "list", "max", "min", "range", "reversed", "round", "set", "sorted", "str", "sum", "tuple",
    "type", "zip", "True", "False", "None")} | {"math": math}


@dataclass
class _Plan:
    """One problem's asserts split into the calls to make in the sandbox and what to check here."""
    calls: list[tuple[str, str, str]]  # (function name, args tuple literal, kwargs dict literal)
    checks: list[tuple[str, object, list[int]]]  # (assert text, compiled test, its calls' indexes)


def _literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _plan(test_list: list[str], test_setup_code: str) -> _Plan | str:
    """The trusted plan for a problem's asserts, or why it takes the in-sandbox path."""
    if test_setup_code.strip():
        return "it has setup code"
    plan = _Plan([], [])
    for text in test_list:
        try:
            body = ast.parse(text).body
        except SyntaxError:
            return f"an assert does not parse: {text!r}"
        if len(body) != 1 or not isinstance(body[0], ast.Assert):
            return f"not a single assert: {text!r}"
        indexes = []

        class ReplaceCalls(ast.NodeTransformer):
            def visit_Call(self, node):
                if isinstance(node.func, ast.Name) and node.func.id not in _TRUSTED_NAMES:
                    if not all(_literal(a) and not isinstance(a, ast.Starred) for a in node.args):
                        raise LookupError(f"a call's arguments are not literals: {text!r}")
                    if not all(k.arg is not None and _literal(k.value) for k in node.keywords):
                        raise LookupError(f"a call's keywords are not literals: {text!r}")
                    args = ast.unparse(ast.Tuple(elts=node.args, ctx=ast.Load()))
                    kwargs = ast.unparse(ast.Dict(keys=[ast.Constant(k.arg) for k in node.keywords],
                                                  values=[k.value for k in node.keywords]))
                    indexes.append(len(plan.calls))
                    plan.calls.append((node.func.id, args, kwargs))
                    return ast.copy_location(ast.Name(f"_returned{len(plan.calls) - 1}", ast.Load()),
                                             node)
                return self.generic_visit(node)
        try:
            test = ReplaceCalls().visit(body[0].test)
        except LookupError as e:
            return str(e)
        for node in ast.walk(test):
            if isinstance(node, ast.Name) and not (node.id in _TRUSTED_NAMES
                                                   or node.id.startswith("_returned")):
                return f"it uses {node.id!r} other than as a call with literal arguments"
        expression = ast.fix_missing_locations(ast.Expression(test))
        plan.checks.append((text, compile(expression, "<assert>", "eval"), indexes))
    if not plan.calls:  # e.g. the task is to write `sum`: its asserts read as builtin calls
        return "its asserts call no name but builtins"
    return plan


def mbpp_verdict_path(test_list: list[str], test_setup_code: str = "") -> str:
    """'trusted' (decided outside the sandbox from returned values) or 'in_sandbox'."""
    return "trusted" if isinstance(_plan(test_list, test_setup_code), _Plan) else "in_sandbox"


def _judge(plan: _Plan, run: SandboxResult) -> SandboxResult:
    """The verdict on a calls-mode run: each assert evaluated here on the values returned."""
    values, notes = [], []
    for line in run.returns or []:
        try:  # untrusted bytes: a JSON string holding a repr, read back as plain data only
            values.append(ast.literal_eval(json.loads(line)))
        except Exception as e:  # noqa: BLE001 - any malformed return is just not a value
            values.append(_NOT_A_LITERAL)
            notes.append(f"a return value is not a Python literal ({type(e).__name__}): "
                         f"{line[:200]}")
    status = "passed"
    for text, test, indexes in plan.checks:
        if any(i >= len(values) for i in indexes):  # a call raised, or the run was cut short
            status = "timeout" if run.status == "timeout" else "error"
            break
        scope = {"__builtins__": {}, **_TRUSTED_NAMES,
                 **{f"_returned{i}": values[i] for i in indexes}}
        try:
            ok = any(values[i] is _NOT_A_LITERAL for i in indexes) is False and eval(test, scope)
        except Exception as e:  # noqa: BLE001 - e.g. sorted() of the wrong type
            notes.append(f"{type(e).__name__} evaluating {text}: {e}")
            status = "error"
            break
        if not ok:
            shown = ", ".join(repr(values[i])[:200] for i in indexes)
            notes.append(f"AssertionError: {text} (returned {shown})")
            status = "failed"
            break
    stderr = run.stderr + "".join(f"\n[verdict: {note}]" for note in notes)
    return dataclasses.replace(run, passed=status == "passed", status=status, stderr=stderr,
                               verdict="trusted")


_NOT_A_LITERAL = object()


# --- MBPP: sandboxed execution ------------------------------------------------------------

def run_mbpp(code: str, test_list: list[str], test_setup_code: str = "", *,
             timeout_s: float = 10.0, memory_mb: int = 1024,
             allow_unisolated: bool = False) -> SandboxResult:
    """Run an MBPP solution against its asserts in the sandbox (harness/sandbox.py), judged
    outside it where the asserts allow (see above; the result's `verdict` says which path).

    Raises SandboxUnavailable where no kernel sandbox works, unless allow_unisolated=True.
    """
    plan = _plan(test_list, test_setup_code)
    if isinstance(plan, _Plan):
        run = run_calls(code, plan.calls, timeout_s=timeout_s, memory_mb=memory_mb,
                        allow_unisolated=allow_unisolated)
        return _judge(plan, run)
    # The setup goes after the code: MBPP's setups build objects from classes the code defines.
    tests = "\n".join([test_setup_code, *test_list]) + "\n"
    return run_sandboxed(code, tests, timeout_s=timeout_s, memory_mb=memory_mb,
                         allow_unisolated=allow_unisolated)
