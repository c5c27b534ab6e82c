"""Reading the arithmetic in model-written math: LaTeX as plain arithmetic, '=' claims, and stated numbers.

Used by score.py (f_numeric, answers) and by anything that edits a chain of thought's arithmetic. Everything here
is linear in the text: no two regex quantifiers can trade characters (possessive `*+` where they could), and no
regex is retried at every start of a long run (the old claim regex took 58 s on '1+' * 10000).

    normalise_math   LaTeX (\\frac, \\times, \\cdot, \\div, display math, \\text{}) -> plain arithmetic
    claims           the distinct 'expression = value' claims of a text, each checked
    read_number      the number an answer states, normalised as math evaluators do (docs/scoring.md)
    evaluate / token_runs / to_number
"""
import functools
import math
import re

BOXED_MAX = 200  # characters: a longer \boxed{} is not an answer, and skipping it keeps nested boxes linear
# LaTeX -> plain arithmetic, in this order (normalise_math). `(?![a-zA-Z])` keeps \cdots from reading as \cdot.
LATEX_SUBS = [(re.compile(p), r) for p, r in [
    (r"\{,\}", ","),                                                    # 1{,}000
    (r"(?<=\d)\\[,!;: ](?=\d)", ""),                                     # 1\,000 (thin-space thousands)
    (r"\^[ \t]*+(?:\{[ \t]*+\\circ[ \t]*+\}|\\circ(?![a-zA-Z]))", " "),  # 90^\circ, 90^{\circ}
    (r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", ""),                 # \left( ... \right)
]]
LATEX_SUBS_AFTER = [(re.compile(p), r) for p, r in [
    (r"\\\\", "\n"),                                                     # a line break in an aligned block
    (r"\\(?:times|cdot|ast)(?![a-zA-Z])", " * "),
    (r"\\div(?![a-zA-Z])", " / "),
    (r"\\(?:text(?:bf|it|rm|normal)?|math(?:rm|bf|it)|mbox|boxed|fbox|operatorname|[dt]extstyle|displaystyle)"
     r"(?![a-zA-Z])", " "),                                              # keep the content, drop the command
    (r"\\%", "%"),                                                       # kept: '25% of 80' is not read as 25 * 80
    (r"\\[\[\]()$,!;: ]|\\q?quad(?![a-zA-Z])|&", " "),                   # \[ \] \( \) \$, spacing, alignment
]]
MATH_CHARS = str.maketrans({"{": " ", "}": " ", "$": " ", "\u2212": "-", "\u00d7": "*", "\u00b7": "*",
                            "\u22c5": "*", "\u00f7": "/", "\u00a0": " ", "\u2009": " "})
FRAC_RE = re.compile(r"\\[dtc]?frac(?![a-zA-Z])[ \t]*+")
SIMPLE_NUM_RE = re.compile(r"[ \t]*+\d[\d.,]*+[ \t]*+")
SPACE_RE = re.compile(r"[ \t]*+")
# Arithmetic claims: spans of numbers, operators, parentheses and '=' (x counts as 'times' only standing alone),
# tokenised; '-' is a sign only glued to its number ('-5', not the bullet '- 5').
SPAN_RE = re.compile(r"(?:[\d.,+\-*/^()= \t]|(?<![^\W\d_])x(?![^\W\d_]))+")
TOKEN_RE = re.compile(r"(\d{1,3}(?:,\d{3})++(?:\.\d++)?|\d++(?:\.\d++)?)|(-(?=[\d(]))|([^ \t])")
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "neg": 3, "^": 4}


def to_number(s):
    """'$1,450.50' -> 1450.5; None if it is not a finite number (a 400-digit one is not: JSON cannot hold it)."""
    try:
        v = float(s.replace("\\", "").replace("$", "").replace(",", "").rstrip("."))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def brace_pairs(text):
    """{index of '{': index of its matching '}'} for the balanced pairs, escaped \\{ \\} ignored; one pass."""
    stack, pairs = [], {}
    for m in re.finditer(r"(?<!\\)[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            pairs[stack.pop()] = m.start()
    return pairs


def _frac_edits(text, pairs):
    """(start, end, replacement) edits that turn \\frac{a}{b} into a/b (plain numbers) or (a)/(b), and x^{e} into
    x^(e), using the brace pairs so nested fractions work."""
    edits = []
    for m in FRAC_RE.finditer(text):
        a = m.end()  # FRAC_RE ate the spaces: the numerator's '{', if there is one
        b = SPACE_RE.match(text, pairs[a] + 1).end() if a in pairs else None
        if b not in pairs:
            continue
        simple = all(SIMPLE_NUM_RE.fullmatch(text, i + 1, pairs[i]) for i in (a, b))  # fails at once otherwise
        edits += [(m.start(), a + 1, " " if simple else " ("), (pairs[a], b + 1, "/" if simple else ")/("),
                  (pairs[b], pairs[b] + 1, " " if simple else ") ")]
    for m in re.finditer(r"\^[ \t]*+\{", text):
        if m.end() - 1 in pairs:
            edits += [(m.end() - 1, m.end(), "("), (pairs[m.end() - 1], pairs[m.end() - 1] + 1, ")")]
    return sorted(edits)


def normalise_math(text):
    """The text with LaTeX arithmetic rewritten as plain arithmetic, for the claim and step readers.

    \\frac{48}{2} -> 48/2 (nested or non-numeric parts get parentheses), \\times \\cdot -> *, \\div -> /,
    1{,}000 -> 1,000, math delimiters \\[ \\] \\( \\) $ and \\text/\\boxed/\\left/\\right wrappers removed (their
    content stays), remaining braces become spaces. Unicode − × · ÷ become - * * /.
    """
    for rx, rep in LATEX_SUBS:
        text = rx.sub(rep, text)
    if "{" in text:
        pieces, at = [], 0
        for start, end, rep in _frac_edits(text, brace_pairs(text)):
            pieces += [text[at:start], rep]
            at = end
        text = "".join(pieces) + text[at:]
    for rx, rep in LATEX_SUBS_AFTER:
        text = rx.sub(rep, text)
    return text.translate(MATH_CHARS)


def token_runs(span, glued=False):
    """The runs of arithmetic tokens in a span: lists of (kind, text), kind n number, o operator (x is *), u sign,
    l '(', r ')'; anything else ('.' ',' ':' '%' '=', a dash that is no operator) ends a run, so there is one run
    more than there are such breaks. glued: the span's first number belongs to a word before it ('v2')."""
    runs = [[]]
    for num, sign, ch in TOKEN_RE.findall(span):
        prev = runs[-1][-1][0] if runs[-1] else None
        if num:
            tok = (None, "") if glued and len(runs) == 1 and not runs[0] else ("n", num)
        elif sign or ch == "-":  # binary after an operand, else a sign if glued to its number, else a dash
            tok = ("o", "-") if prev in ("n", "r") else (("u", "-") if sign else (None, ""))
        elif ch in "+*/^x":
            tok = ("o", "*" if ch == "x" else ch)
        else:
            tok = ({"(": "l", ")": "r"}.get(ch), ch)
        glued = False
        if tok[0] is None:
            runs.append([])
        else:
            runs[-1].append(tok)
    return runs


def _left_side(part):
    """(tail, has_operator): the longest tail of `part` that is a well-formed expression (the left side of the '='
    after it), and whether it holds a binary operator."""
    cut, depth, want_end, ops, cut_ops = len(part), 0, True, 0, 0  # reading right to left; want_end: a number or ')'
    for i in range(len(part) - 1, -1, -1):
        kind = part[i][0]
        if want_end and kind == "r":
            depth += 1
            continue
        if want_end and kind == "n":
            want_end = False
        elif not want_end and kind == "o":
            want_end, ops = True, ops + 1
            continue
        elif not want_end and (kind == "u" or (kind == "l" and depth > 0)):
            depth -= kind == "l"
        else:
            break
        if depth == 0:
            cut, cut_ops = i, ops
    return part[cut:], cut_ops > 0


def _right_side(part):
    """The longest head of `part` that is a well-formed expression: the right side of the '=' before it."""
    cut, depth, want_operand = 0, 0, True
    for i, (kind, _) in enumerate(part):
        if want_operand and kind in ("u", "l"):
            depth += kind == "l"
            continue
        if want_operand and kind == "n":
            want_operand = False
        elif not want_operand and kind == "o":
            want_operand = True
            continue
        elif not want_operand and kind == "r" and depth > 0:
            depth -= 1
        else:
            break
        if depth == 0:
            cut = i + 1
    return part[:cut]


def _apply(op, vals):
    """Apply one operator to the value stack; a result that is not a real number is nan (no claim about it holds)."""
    if op == "neg":
        vals[-1] = -vals[-1]
        return
    b, a = vals.pop(), vals.pop()
    try:
        if op == "+":
            v = a + b
        elif op == "-":
            v = a - b
        elif op == "*":
            v = a * b
        elif op == "/":
            v = a / b
        else:
            v = a ** b
    except (ZeroDivisionError, OverflowError):  # 5 / 0, 10^400
        v = math.nan
    vals.append(v if isinstance(v, float) else math.nan)  # (-8)^0.5 is complex


def evaluate(toks):
    """Value of a well-formed expression by shunting-yard (no eval): + - * / ^, signs, parentheses, the usual
    precedence; ^ binds tighter than a sign (-2^2 = -4) and is right-associative."""
    if len(toks) == 1:  # the common right side: a number
        return float(toks[0][1].replace(",", ""))
    vals, ops = [], []
    for kind, t in toks:
        if kind == "n":
            vals.append(float(t.replace(",", "")))
        elif kind in ("u", "l"):
            ops.append("neg" if kind == "u" else "(")
        elif kind == "r":
            while ops[-1] != "(":
                _apply(ops.pop(), vals)
            ops.pop()
        else:
            while ops and ops[-1] != "(" and (PRECEDENCE[ops[-1]] > PRECEDENCE[t] or
                                             (PRECEDENCE[ops[-1]] == PRECEDENCE[t] and t != "^")):
                _apply(ops.pop(), vals)
            ops.append(t)
    while ops:
        _apply(ops.pop(), vals)
    return vals[0]


def _leading_operand(toks):
    """The right side up to its first top-level operator: '5' of '5 + 1' (a running total: 2 + 3 = 5 + 1 = 7)."""
    depth = 0
    for i, (kind, _) in enumerate(toks):
        depth += (kind == "l") - (kind == "r")
        if kind == "o" and depth == 0:
            return toks[:i]
    return toks


def _decimals(toks):
    """Decimal places written, when the tokens hold a single number ('3.33' -> 2); else None."""
    nums = [t for k, t in toks if k == "n"]
    return len(nums[0].partition(".")[2]) if len(nums) == 1 else None


def claim_holds(lhs, rhs, decimals):
    """Exact for an integer result; to the written precision for a single decimal number ('10/3 = 3.33' holds);
    1e-6 relative for an expression (decimals None)."""
    if not (math.isfinite(lhs) and math.isfinite(rhs)):
        return False
    tol = 0.5 * 10 ** -decimals if decimals else 1e-6 * max(1.0, abs(rhs))
    return abs(lhs - rhs) <= tol


def _sides(part, glued=False):
    """What a text between two '=' contributes: the well-formed tail of its last token run (the left side of the
    '=' after it) and the well-formed head of its first run (the right side of the '=' before it).

    Returns (left, has_operator, left value), (right, right value, decimals, leading operand's value, decimals);
    values are computed here once per distinct text, as a loop repeats the same one.
    """
    runs = token_runs(part, glued)
    (left, has_op), right = _left_side(runs[-1]), tuple(_right_side(runs[0]))
    left, lead = tuple(left), _leading_operand(right)
    rhs = evaluate(right) if right else None
    return ((left, has_op, evaluate(left) if has_op else None),
            (right, rhs, _decimals(right), evaluate(lead) if lead != right else rhs, _decimals(lead)))


@functools.lru_cache(maxsize=4)  # faithfulness() asks for a text's claims from two parts
def claims(text):
    """The distinct arithmetic claims of a text, LaTeX read as arithmetic: [(key, holds, result)], first seen first.

    A claim is an '=' whose left side (the expression right before it, back to any previous '=') holds an
    operator and whose right side (the expression right after it) is not empty: a chain a = b = c makes one
    claim per '='. Distinct by their tokens; a text between two '=' is read once however often it repeats.
    """
    seen, memo, out = set(), {}, []
    for line in normalise_math(text).split("\n"):
        if "=" not in line:
            continue
        for m in SPAN_RE.finditer(line):
            if "=" not in m.group():
                continue
            glued = m.start() > 0 and m.group()[0].isdigit() and re.match(r"[^\W\d]", line[m.start() - 1])
            sides = []
            for i, part in enumerate(m.group().split("=")):
                k = (part, bool(glued) and i == 0)
                if k not in memo:
                    memo[k] = _sides(*k)
                sides.append(memo[k])
            for before, after in zip(sides, sides[1:]):
                (left, has_op, lhs), (right, rhs, dec, lead, lead_dec) = before[0], after[1]
                # a running total, '2 + 3 = 5 + 1 = 7': the left side may equal the right side's leading operand
                if right and has_op and (left, right) not in seen:
                    seen.add((left, right))
                    out.append(((left, right), claim_holds(lhs, rhs, dec) or claim_holds(lhs, lead, lead_dec), rhs))
    return out


def same_number(a, b):
    """Do two answers agree? Both numbers, equal to 1e-6 relative to b (exact for the integers GSM8K uses)."""
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def read_number(s):
    """The number an answer states, normalised as math evaluators do (Qwen2.5-Math's strip_string, lm-eval's
    Minerva normaliser): \\$ $ \\% % ^\\circ, thousands separators (, {,} \\, \\!), spaces, \\text{} and
    \\mbox{} units, a trailing '.' and 'x =' removed; \\frac{a}{b} and a/b read as a/b, and any other arithmetic
    of numbers as its value. None if what is left is not arithmetic of numbers (docs/scoring.md has the table)."""
    if len(s) > BOXED_MAX:
        return None
    s = re.sub(r"\\[,!;: ]|\\(?:left|right|displaystyle)(?![a-zA-Z])|\\[$%]|[$%°~]|\s", "", s.replace("{,}", ","))
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = re.sub(r"\\(?:text(?:bf|rm|it)?|math(?:rm|bf)|mbox|boxed)\{([^{}]*)\}", r"\1", s)  # \text{18}, \text{dollars}
    s = re.sub(r"\\[dtc]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\[dtc]?frac(\d)(\d)", r"\1/\2", s)
    s = s.split("=")[-1]  # 'x = 5', '48 + 24 = 72': the value after the last '='
    last = max(s.rfind(d) for d in "0123456789")
    if last < 0:
        return None
    if re.search(r"[^\W\d_]", s[last + 1:]):  # a unit after the number: '18dollars' (spaces are gone)
        s = s[:last + 1] + ")" * s[last + 1:].count(")")
    s = re.sub(r"(?<![\d)])\.(?=\d)", "0.", s.rstrip(".")).replace("{", "(").replace("}", ")")  # .5 -> 0.5; 2^{3}
    runs = token_runs(s)
    if len(runs) != 1 or not runs[0] or _right_side(runs[0]) != runs[0]:  # a break, or not one expression
        return None
    v = evaluate(runs[0])
    return v if math.isfinite(v) else None
