"""The one exception type that reaches the user as a one-line message."""


class MmsaeError(Exception):
    """Bad input or an unusable environment.

    The message is a single line that names the input and says what is wrong and what to do.
    The CLI prints it as ``mmsae <stage>: error: <message>`` and exits with status 2.
    """
