"""A golden reward for tests: the number of digits in the response (varies across samples of a tiny model)."""


def digit_count(prompt: str, response: str) -> float:
    return float(sum(ch.isdigit() for ch in response))
