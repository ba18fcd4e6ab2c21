"""The built-in ``math`` tool: exact evaluation with sympy. The expression is parsed with
Python's ``ast`` and each node mapped to a sympy object from a fixed table, so no text is
ever evaluated as code (sympy's own ``parse_expr`` calls ``eval``)."""
from __future__ import annotations

import ast
import operator
from typing import Any, Callable

import sympy

MAX_EXPRESSION_CHARS = 2000
MAX_POWER_EXPONENT = 10_000  # 2**10**9 would spin one core for minutes
MAX_FACTORIAL_ARGUMENT = 10_000  # the same for factorial(10**9)
DECIMAL_DIGITS = 15

FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": sympy.sqrt, "cbrt": sympy.cbrt, "root": sympy.root, "exp": sympy.exp,
    "log": sympy.log, "ln": sympy.log, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan,
    "asin": sympy.asin, "acos": sympy.acos, "atan": sympy.atan, "sinh": sympy.sinh,
    "cosh": sympy.cosh, "tanh": sympy.tanh, "abs": sympy.Abs, "floor": sympy.floor,
    "ceiling": sympy.ceiling, "factorial": sympy.factorial, "binomial": sympy.binomial,
    "gcd": sympy.gcd, "lcm": sympy.lcm, "isprime": sympy.isprime, "factorint": sympy.factorint,
    "simplify": sympy.simplify, "expand": sympy.expand, "factor": sympy.factor,
    "diff": sympy.diff, "integrate": sympy.integrate, "limit": sympy.limit,
    "solve": sympy.solve, "summation": sympy.summation, "Rational": sympy.Rational,
    "min": sympy.Min, "max": sympy.Max, "mod": sympy.Mod, "N": sympy.N,
}
CONSTANTS = {"pi": sympy.pi, "e": sympy.E, "E": sympy.E, "I": sympy.I, "i": sympy.I,
             "oo": sympy.oo, "inf": sympy.oo, "infinity": sympy.oo}
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv, ast.Pow: operator.pow, ast.Mod: sympy.Mod,
          ast.FloorDiv: lambda a, b: sympy.floor(a / b)}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class MathError(ValueError):
    """An expression the tool cannot read or evaluate."""


def _build(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _build(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return sympy.nsimplify(node.value) if isinstance(node.value, float) else sympy.Integer(node.value)
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        if node.id.isidentifier() and len(node.id) <= 16:
            return sympy.Symbol(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = _build(node.left), _build(node.right)
        if isinstance(node.op, ast.Pow) and right.is_number and abs(right) > MAX_POWER_EXPONENT:
            raise MathError(f"exponent {right} is too large (at most {MAX_POWER_EXPONENT})")
        return BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](_build(node.operand))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
        return sympy.Eq(_build(node.left), _build(node.comparators[0]))
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_build(item) for item in node.elts)
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS
            and not node.keywords):
        args = [_build(arg) for arg in node.args]
        if node.func.id in ("factorial", "binomial") and any(
                getattr(a, "is_number", False) and abs(a) > MAX_FACTORIAL_ARGUMENT for a in args):
            raise MathError(f"{node.func.id} of more than {MAX_FACTORIAL_ARGUMENT} is too large")
        return FUNCTIONS[node.func.id](*args)
    raise MathError(f"unsupported syntax: {ast.unparse(node)!r}")


def parse_math(expression: str) -> Any:
    """``expression`` as a sympy object. ``^`` is a power; ``a = b`` an equation (solved for
    its symbols). Raises MathError for anything outside arithmetic, the FUNCTIONS table,
    CONSTANTS and symbols."""
    text = expression.strip()
    if not text:
        raise MathError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise MathError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = text.replace("^", "**").replace("×", "*").replace("÷", "/")
    if "=" in text and "==" not in text and text.count("=") == 1:
        text = text.replace("=", "==")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise MathError(f"cannot parse {expression!r}: {exc.msg}") from None
    return _build(tree)


def evaluate_math(expression: str) -> str:
    """The exact value of ``expression`` (an equation: its solutions), with a decimal
    approximation when the exact form is not a plain number."""
    value = parse_math(expression)
    if isinstance(value, sympy.Equality):
        value = sympy.solve(value, sorted(value.free_symbols, key=str) or None)
    elif isinstance(value, sympy.Basic):
        value = sympy.simplify(value)
    exact = str(value)
    if isinstance(value, sympy.Basic) and value.is_number and not value.is_Integer:
        approx = str(sympy.N(value, DECIMAL_DIGITS))
        if "." in approx and "e" not in approx.lower():
            approx = approx.rstrip("0").rstrip(".")
        if approx != exact:
            return f"{exact} ≈ {approx}"
    return exact
