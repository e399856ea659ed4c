"""The reward of examples/qwen2_chat/config.yaml: a verifiable check against the row's `letter` column.

The data set is conversational, so (as with TRL's GRPOTrainer) each completion arrives as a list of
messages, [{"role": "assistant", "content": TEXT}]."""


def starts_with_letter(prompts, completions, letter, **kwargs):
    """1.0 where the reply's first word starts with the row's letter, else 0.0."""
    out = []
    for completion, want in zip(completions, letter):
        words = completion[0]["content"].split()
        out.append(float(bool(words) and words[0].lower().startswith(want)))
    return out
