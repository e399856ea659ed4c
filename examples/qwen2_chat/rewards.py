"""The reward of examples/qwen2_chat/config.yaml: a verifiable check against the row's `letter` column."""


def starts_with_letter(prompts, completions, letter, **kwargs):
    """1.0 where the completion's first word starts with the row's letter, else 0.0."""
    out = []
    for completion, want in zip(completions, letter):
        words = completion.split()
        out.append(float(bool(words) and words[0].lower().startswith(want)))
    return out
