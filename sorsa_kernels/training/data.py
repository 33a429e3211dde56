"""Instruction data for fine-tuning: file loading and the embedded arithmetic data set.

Records are ``{"prompt": str, "response": str}`` dicts.  :func:`load_records` reads
``.jsonl``, ``.json`` (a list of objects) and ``.parquet`` files with configurable field
names; :func:`arithmetic_problems` generates the bundled word-problem data set
deterministically; :func:`arithmetic_equations` generates the plain-equation text the
embedded model is pretrained on.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Union

from ..nn.knobs import FRACTION

__all__ = [
    "DataError",
    "SUPPORTED_EXTENSIONS",
    "load_records",
    "arithmetic_problems",
    "arithmetic_equations",
    "split_records",
]

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A data file that cannot be used: missing, empty, malformed, or lacking a field."""


def _not_utf8(path: Path, lineno: int, e: UnicodeDecodeError, offset: int = 0) -> DataError:
    return DataError(
        f"{path}: line {lineno} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {offset + e.start}); "
        "convert the file to UTF-8"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None


def _read_jsonl(path: Path) -> list:
    rows = []
    offset = 0
    for lineno, raw in enumerate(_read_bytes(path).splitlines(keepends=True), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, lineno, e, offset) from None
        offset += len(raw)
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
    return rows


def _read_json(path: Path) -> list:
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, raw[: e.start].count(b"\n") + 1, e) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: one list-valued key
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of objects (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return data


def _read_parquet(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading .parquet files needs pyarrow (pip install pyarrow); "
            "or convert the data to .jsonl"
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: cannot read parquet file ({e})") from None


def _check_text(text: str, path: Path, i: int, field: str) -> None:
    """A string the tokenizer can take: no lone UTF-16 surrogate (JSON's ``"\\ud800"`` decodes to one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{path}: record {i} field {field!r} holds a lone surrogate {text[e.start]!r} at character {e.start}, "
            "which is not text (a half of a UTF-16 pair); fix or drop the record"
        ) from None


def load_records(
    path: Union[str, Path], prompt_field: str = "prompt", response_field: str = "response"
) -> list[dict]:
    """Read prompt/response pairs from a ``.jsonl``, ``.json`` or ``.parquet`` file.

    Returns a list of ``{"prompt": str, "response": str}`` whatever the field names in
    the file.  Raises :class:`DataError` (a ``ValueError``) naming the file and the
    problem if the file is missing, empty, malformed, or a record lacks a field.

    Example::

        >>> rows = load_records("train.jsonl", prompt_field="query", response_field="answer")
        >>> rows[0]
        {'prompt': 'What is 2+2?', 'response': '4'}
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"unsupported data file extension {ext or '(none)'!r} for {path}; "
            f"allowed: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data file {path} is not a regular file")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    rows = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}[ext](path)
    if not rows:
        raise DataError(f"data file {path} has no records")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i} is a {type(row).__name__}, expected an object")
        for field in (prompt_field, response_field):
            if field not in row:
                raise DataError(
                    f"{path}: record {i} has no field {field!r} (it has: {', '.join(map(repr, row)) or 'none'}); "
                    "set the field names with --prompt-field/--response-field"
                )
            if not isinstance(row[field], str):
                raise DataError(
                    f"{path}: record {i} field {field!r} is a {type(row[field]).__name__}, expected a string"
                )
            _check_text(row[field], path, i, field)
        out.append({"prompt": row[prompt_field], "response": row[response_field]})
    return out


# ---------------------------------------------------------------------- embedded data
_NAMES = ("Ann", "Ben", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lou")
_THINGS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "eggs")
# (template, operation): the answer is a + b or a - b.  Every template names both numbers.
_TEMPLATES = (
    ("{n} has {a} {t}. {n} gets {b} more. How many {t} does {n} have?", "+"),
    ("There are {a} {t} in a box and {b} in a bag. How many {t} in all?", "+"),
    ("{n} buys {a} {t} and then {b} more. How many {t} did {n} buy?", "+"),
    ("{n} has {a} {t} and gives {b} away. How many {t} are left?", "-"),
    ("{n} had {a} {t} and lost {b}. How many {t} remain?", "-"),
    ("A shelf holds {a} {t}. {b} are taken. How many {t} are on the shelf?", "-"),
)
MAX_OPERAND = 9


def arithmetic_problems(n: int = 600, seed: int = 0) -> list[dict]:
    """``n`` one-step addition/subtraction word problems, the same for the same ``seed``.

    Operands are 0–9 (subtraction never goes below 0); the response is the number alone.

    Example::

        >>> arithmetic_problems(1, seed=0)[0]["response"]
        '7'
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        template, op = rng.choice(_TEMPLATES)
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        if op == "-" and b > a:
            a, b = b, a
        prompt = template.format(n=rng.choice(_NAMES), t=rng.choice(_THINGS), a=a, b=b)
        rows.append({"prompt": prompt, "response": str(a + b if op == "+" else a - b)})
    return rows


def arithmetic_equations(n: int, seed: int = 0) -> list[str]:
    """``n`` lines like ``"3+4=7"`` / ``"9-2=7"`` (operands 0–9): the embedded model's pretraining text."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        if rng.random() < 0.5:
            lines.append(f"{a}+{b}={a + b}")
        else:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a}-{b}={a - b}")
    return lines


def split_records(rows: list[dict], eval_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Shuffle deterministically and split off ``eval_fraction`` of the records (at least one
    on each side when there are two or more; none held out when ``eval_fraction`` is 0)."""
    FRACTION.check(eval_fraction, "eval fraction", required=True)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction == 0 or len(rows) < 2 else min(len(rows) - 1, max(1, round(eval_fraction * len(rows))))
    held = [rows[i] for i in order[:n_eval]]
    train = [rows[i] for i in order[n_eval:]]
    return train, held
