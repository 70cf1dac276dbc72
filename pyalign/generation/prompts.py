"""The prompts of a generation call, checked and keyed: a text or a conversation each, a system prompt
per call or per prompt, and which earlier identical (system, prompt) entries a row repeats.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyalign.data.pairs import RowError, check_messages, normalize_prompt


def per_prompt(system, count: int, name: str = "system") -> list[str | None]:
    """One system prompt per prompt from ``system``: a string or None for all, or a list."""
    if system is None or isinstance(system, str):
        return [system] * count
    systems = list(system)
    if len(systems) != count:
        raise ValueError(f"{name}: expected one system prompt per prompt ({count}), got {len(systems)}")
    for i, value in enumerate(systems):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}[{i}]: expected a string or None, got {type(value).__name__}")
    return systems


def check_texts(values, name: str = "prompts") -> list[str]:
    """``values`` as a list of strings, or a ValueError naming ``name`` and the bad item."""
    if isinstance(values, str):
        raise ValueError(f"{name}: expected a list of strings, got a single string")
    values = list(values)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{name}[{i}]: expected a string, got {type(value).__name__}")
    return values


def check_prompt(value, system: str | None, where: str):
    """One prompt: a text, or chat messages (``{"role", "content"}``; roles system/user/assistant,
    a system message only first and not together with a separate system prompt, ending with the
    user's turn: the rules of :mod:`pyalign.data.pairs`). Returns the text, or the messages as a
    tuple of ``{"role", "content"}`` dicts; a ValueError starting with ``where`` otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        raise ValueError(f"{where}: expected a string or a list of chat messages, got one message (a dict); "
                         "a conversation is a list of messages, so several prompts are a list of such lists")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a string or a list of chat messages, got {type(value).__name__}")
    try:
        messages = check_messages(value, "prompt")
        normalize_prompt(messages, "prompt", system)  # the structural rules; the form given is kept
    except RowError as error:
        raise ValueError(f"{where}: {error}") from None
    return tuple(messages)


def check_prompts(prompts, system=None, name: str = "prompts") -> tuple[list, list[str | None]]:
    """``(prompts, systems)``: every prompt checked by :func:`check_prompt` (errors name
    ``name[i]``), and one system prompt per prompt from ``system`` (:func:`per_prompt`)."""
    if isinstance(prompts, str):
        raise ValueError(f"{name}: expected a list of prompts, got a single string")
    prompts = list(prompts)
    systems = per_prompt(system, len(prompts))
    return [check_prompt(p, s, f"{name}[{i}]") for i, (p, s) in enumerate(zip(prompts, systems))], systems


def hashable_prompt(prompt):
    """A prompt as a dictionary key: the text, or a tuple of ``(role, content)`` pairs."""
    return prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)


def occurrence_numbers(prompts: Sequence, systems: Sequence[str | None]) -> list[int]:
    """For each position, how many identical ``(system, prompt)`` entries come before it."""
    seen: dict[tuple, int] = {}
    numbers = []
    for key in zip(systems, map(hashable_prompt, prompts)):
        numbers.append(seen.get(key, 0))
        seen[key] = numbers[-1] + 1
    return numbers
