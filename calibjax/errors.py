"""The one base of every error calibjax reports to a user.

Each subclass lives where its cause does (``SweepError`` in ``calibjax.sweep``, ``SetupError`` in
``calibjax.execution.runtime``, ...). The command line prints such an error's message, one line
that names the file, the key and what is wrong, and exits 2: no traceback for a user's mistake.
Catch ``calibjax.CalibjaxError`` to handle them all.
"""


class CalibjaxError(ValueError):
    """A mistake in calibjax's input or environment, said in one line (the file, the key, the problem).

    A ``ValueError`` too, as every one of these was before it had a common base."""
