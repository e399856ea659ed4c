"""Environments of the episode tests (named "tests/episodes/envs.py:Class" in configs)."""


class OneTurn:
    """One policy answers once; rewarded by its answer's length (as the reward function `length`)."""

    def reset(self, **row):
        self.text = ""

    def step(self, role, message):
        self.text = message["content"]

    def get_reward(self) -> float:
        return len(self.text) / 10


def length(completions, **kwargs):
    """The single-turn twin of OneTurn's reward."""
    return [len(c[0]["content"]) / 10 for c in completions]


class Calculator:
    """TRL's environment_factory form: reset(**row), a tool, get_reward."""

    def reset(self, **row):
        self.a, self.b = row["a"], row["b"]
        self.calls = []
        self.answer = None

    def add(self, a: int, b: int) -> str:
        """Add two integers.

        Args:
            a: the first integer
            b: the second integer
        """
        self.calls.append((a, b))
        return str(a + b)

    def get_reward(self) -> float:
        return 1.0 if self.calls == [(self.a, self.b)] else 0.0


class AskAnswer:
    """Two roles: the asker speaks first, the answerer replies; one turn each."""

    roles = ["asker", "answerer"]
    turns = 2

    def reset(self, **row):
        self.said = []

    def next_role(self):
        return self.roles[len(self.said) % 2] if len(self.said) < self.turns else None

    def step(self, role, message):
        self.said.append((role, message["content"]))

    def rewards(self):
        reply = self.said[1][1] if len(self.said) > 1 else ""
        return {"asker": 0.0, "answerer": len(reply) / 10}


class Dialogue(AskAnswer):
    """asker, answerer, asker: the asker's row holds the answerer's turn between its own two."""

    turns = 3


class NoReset:
    def get_reward(self):
        return 0.0


class BadTool:
    def reset(self, **row):
        pass

    def tool(self, x):
        return x

    def get_reward(self):
        return 0.0
