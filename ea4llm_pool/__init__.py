"""ea4llm-pool: gradient-free (EA4LLM evolution strategies) training of causal LMs over a worker pool."""

__version__ = "0.1.0"


class UserError(Exception):
    """An error caused by user input (config, CLI, data, checkpoint). The CLI prints it as one line."""


def quiet_transformers() -> None:
    """Silence transformers' progress bars and advisory warnings (our own output says what happens)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # an old or unusual transformers: its chatter is harmless
        pass
