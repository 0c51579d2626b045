"""The final number of a worked answer, as generation is scored (exact match, GSM8K style)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: optional minus (not a subtraction between digits), thousands commas, optional decimals.
NUMBER = re.compile(r"(?<!\d)-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# Where an answer states itself: "The answer is N", GSM8K's "#### N".
STATED = re.compile(r"(?:answer is|####)\s*:?\s*\$?\s*((?<!\d)-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)", re.I)


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '-0' -> '0', '18.00' -> '18'; None if not a number."""
    try:
        d = Decimal(text.replace(",", "").strip())
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def final_number(text: str) -> str | None:
    """The answer's number: the last one it states ('The answer is N', '#### N'), else its last
    number; None when it holds no number (a scored miss, never an error)."""
    stated = STATED.findall(text)
    if stated:
        return normalize_number(stated[-1])
    found = NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def same_number(predicted: str | None, gold: str) -> bool:
    return predicted is not None and predicted == normalize_number(gold)


def gsm8k_solution(text: str) -> tuple[str, str]:
    """GSM8K's answer field -> (worked solution ending 'The answer is N.', N): the calculator
    annotations <<...>> dropped, the '#### N' line rewritten."""
    body, _, final = text.rpartition("####")
    gold = final.strip().replace(",", "")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {gold}.".strip(), gold
