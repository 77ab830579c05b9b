"""Hostile inputs shared by the reliability tests."""

RELATION = {
    "name": "planet",
    "causal": False,
    "fact": ["{subject} was born on {fact}."],
    "implication": ["{subject} collects {implication}."],
    "pairs": [["Mars", "stamps"], ["Venus", "coins"]],
}


def alias_bomb(levels: int = 10, width: int = 9) -> str:
    """A YAML flow list whose anchors expand to width**levels strings in a few hundred bytes."""
    nodes = ["&a0 [" + ",".join(["x"] * width) + "]"]
    nodes += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(nodes) + "]"
